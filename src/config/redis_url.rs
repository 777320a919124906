//! `redis+sentinel://` and `redis+cluster://` URLs taken apart (the `redis` crate parses only
//! single-server URLs). Errors never quote the URL: it may hold a credential.

/// A `redis+sentinel://` or `redis+cluster://` URL taken apart.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct MultiHost {
    /// `rediss+…`: TLS to every node.
    pub(super) tls: bool,
    /// Sentinel (else Cluster).
    pub(super) sentinel: bool,
    /// The ACL user, if one is named.
    pub(super) user: Option<String>,
    /// The Sentinels' or the cluster seeds' addresses.
    pub(super) hosts: Vec<(String, u16)>,
    /// The Sentinel master name (Sentinel only).
    pub(super) master_name: String,
    /// The database (0 with Cluster).
    pub(super) db: i64,
}

/// Longest Sentinel master name accepted (they are short identifiers).
const MAX_MASTER_NAME: usize = 128;

/// Parses `redis[s]+sentinel://[user@]h1:p1,h2:p2/master[/db]` or
/// `redis[s]+cluster://[user@]h1:p1,h2:p2[/0]`; `None` for other schemes. The error never
/// quotes the URL (it may hold a credential).
pub(super) fn parse_multi_host(url: &str) -> Option<Result<MultiHost, &'static str>> {
    let (rest, tls, sentinel) = if let Some(r) = url.strip_prefix("redis+sentinel://") {
        (r, false, true)
    } else if let Some(r) = url.strip_prefix("rediss+sentinel://") {
        (r, true, true)
    } else if let Some(r) = url.strip_prefix("redis+cluster://") {
        (r, false, false)
    } else if let Some(r) = url.strip_prefix("rediss+cluster://") {
        (r, true, false)
    } else {
        return None;
    };
    Some(parse_hosts_and_path(rest, tls, sentinel))
}

fn parse_hosts_and_path(rest: &str, tls: bool, sentinel: bool) -> Result<MultiHost, &'static str> {
    if rest.contains(['#', '?']) {
        return Err("query strings and fragments are not accepted");
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (user, hosts) = match authority.rsplit_once('@') {
        Some((u, _)) if u.contains(':') => {
            return Err(
                "must not contain a password; use password_file or password = \"${ENV_VAR}\"",
            )
        }
        Some(("", _)) => return Err("names an empty user"),
        Some((u, h)) => (Some(u.to_string()), h),
        None => (None, authority),
    };
    let default_port = if sentinel { 26379 } else { 6379 };
    let mut parsed = Vec::new();
    for h in hosts.split(',') {
        let (host, port) = match h.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or("an IPv6 address lacks its ]")?;
                match after {
                    "" => (host, None),
                    p => (
                        host,
                        Some(p.strip_prefix(':').ok_or("a port must follow ':'")?),
                    ),
                }
            }
            None => match h.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (h, None),
            },
        };
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err("names an empty or malformed host (h1:26379,h2:26379)");
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err("names a port that is not 1 to 65535"),
            },
        };
        parsed.push((host.to_string(), port));
    }
    let mut segments = path.split('/').filter(|s| !s.is_empty());
    let master_name = if sentinel {
        match segments.next() {
            Some(m)
                if m.len() <= MAX_MASTER_NAME
                    && m.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
            {
                m.to_string()
            }
            Some(_) => {
                return Err("names a malformed master name (letters, digits, '.', '_', '-')")
            }
            None => return Err("names no master: redis+sentinel://h1:26379,h2:26379/mymaster/0"),
        }
    } else {
        String::new()
    };
    let db = match segments.next() {
        None => 0,
        Some(d) => d
            .parse::<i64>()
            .ok()
            .filter(|d| *d >= 0)
            .ok_or("names a database that is not a number")?,
    };
    if segments.next().is_some() {
        return Err("has a path longer than /master/db");
    }
    if !sentinel && db != 0 {
        return Err("names a database: Redis Cluster has only database 0");
    }
    Ok(MultiHost {
        tls,
        sentinel,
        user,
        hosts: parsed,
        master_name,
        db,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_and_cluster_urls_are_parsed() {
        let m = parse_multi_host("redis+sentinel://u@h1:26380,h2,[::1]:26381/mymaster/2")
            .unwrap()
            .unwrap();
        assert_eq!(
            m,
            MultiHost {
                tls: false,
                sentinel: true,
                user: Some("u".into()),
                hosts: vec![
                    ("h1".into(), 26380),
                    ("h2".into(), 26379),
                    ("::1".into(), 26381)
                ],
                master_name: "mymaster".into(),
                db: 2,
            }
        );
        let c = parse_multi_host("redis+cluster://h1:7000,h2:7001")
            .unwrap()
            .unwrap();
        assert_eq!(c.hosts, vec![("h1".into(), 7000), ("h2".into(), 7001)]);
        assert!(parse_multi_host("redis://h").is_none());
        for bad in [
            "redis+sentinel://h1:26379",
            "redis+sentinel://h1:26379/",
            "redis+sentinel://u:pw@h1/m",
            "redis+sentinel://h1:0/m",
            "redis+sentinel://h1:x/m",
            "redis+sentinel://,h2/m",
            "redis+sentinel://h1/m a",
            "redis+sentinel://h1/m/x",
            "redis+sentinel://h1/m/0/extra",
            "redis+sentinel://[::1/m",
            "redis+cluster://h1/3",
            "redis+cluster://h1?x=1",
        ] {
            let why = parse_multi_host(bad).unwrap().unwrap_err();
            assert!(!why.contains("pw"), "{bad}: {why}");
        }
    }
}
