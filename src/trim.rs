//! Gives the kernel back the pages of start-up code once the sidecar is serving.
//!
//! Configuration parsing, certificate validation, the first login and the CLI touch most of the
//! 11 MB of machine code in the binary once; the kernel then keeps those file pages mapped (and
//! charged to the pod) although the request path uses a small part of them. Once every tenant
//! has a session, [`page_out_executable`] asks the kernel to reclaim the executable's read-only
//! file mappings (`madvise(MADV_PAGEOUT)`, Linux ≥ 5.4). The code the proxy keeps running is
//! read back on first use: from the page cache if the pages are still cached, otherwise from the
//! image's file system (a one-time cost of some page faults right after start-up). Nothing is
//! written anywhere: only clean file pages are reclaimed; writable mappings and mappings holding
//! relocated (anonymous copy-on-write) pages are left alone. This is what the kernel does by
//! itself under memory pressure, done once, early.

/// Resident set before and after, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trimmed {
    /// `VmRSS` before.
    pub before_kib: u64,
    /// `VmRSS` after.
    pub after_kib: u64,
}

/// Reclaims the executable's read-only file mappings. `None` where unsupported.
pub fn page_out_executable() -> Option<Trimmed> {
    let exe = std::fs::read_link("/proc/self/exe").ok()?;
    let exe = exe.to_str()?;
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let before_kib = rss_kib()?;
    for (start, end) in clean_readonly_ranges(&smaps, exe) {
        page_out(start, end);
    }
    Some(Trimmed {
        before_kib,
        after_kib: rss_kib()?,
    })
}

/// `[start, end)` of each mapping of `path` that is neither writable nor holds anonymous
/// (relocated, copy-on-write) pages, from `/proc/self/smaps` text.
pub fn clean_readonly_ranges(smaps: &str, path: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // The mapping being read: its range, and whether it qualifies so far.
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(anon) = line.strip_prefix("Anonymous:") {
            let anon_kib = anon.trim().trim_end_matches("kB").trim().parse::<u64>();
            if let (Some(range), Ok(0)) = (current.take(), anon_kib) {
                out.push(range);
            }
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            usize::from_str_radix(start, 16),
            usize::from_str_radix(end, 16),
        ) else {
            continue;
        };
        let name = fields.nth(3);
        current = (name == Some(path) && !perms.contains('w') && perms.len() == 4)
            .then_some((start, end));
    }
    out
}

#[cfg(target_os = "linux")]
fn page_out(start: usize, end: usize) {
    // SAFETY: a range of this process's own mapping, taken from /proc/self/maps; MADV_PAGEOUT
    // only drops clean file pages from memory (they are read back on use), it never changes
    // what the memory contains. An unsupported kernel returns EINVAL, which is ignored.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT);
    }
}

#[cfg(not(target_os = "linux"))]
fn page_out(_start: usize, _end: usize) {}

fn rss_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_readonly_mappings_of_the_executable() {
        let smaps = "\
5654f9fd0000-5654fa449000 r--p 00000000 fe:00 10010625                   /usr/bin/finhub-sidecar
Size:               4580 kB
Rss:                2176 kB
Anonymous:             0 kB
5654fa449000-5654faf3d000 r-xp 00478000 fe:00 10010625                   /usr/bin/finhub-sidecar
Size:              11216 kB
Anonymous:             0 kB
5654faf3d000-5654fafcb000 r--p 00f6b000 fe:00 10010625                   /usr/bin/finhub-sidecar
Size:                568 kB
Anonymous:           568 kB
5654fafcb000-5654fafd1000 rw-p 00ff8000 fe:00 10010625                   /usr/bin/finhub-sidecar
Anonymous:            24 kB
7f0000000000-7f0000001000 r-xp 00000000 fe:00 42                         /usr/lib/libc.so.6
Anonymous:             0 kB
7f0000002000-7f0000003000 rw-p 00000000 00:00 0
Anonymous:             4 kB
";
        assert_eq!(
            clean_readonly_ranges(smaps, "/usr/bin/finhub-sidecar"),
            [
                (0x5654f9fd0000, 0x5654fa449000),
                (0x5654fa449000, 0x5654faf3d000)
            ]
        );
    }

    #[test]
    fn paging_out_keeps_the_process_working() {
        let t = page_out_executable().expect("linux with /proc");
        assert!(t.before_kib > 0 && t.after_kib > 0);
        // Code paged out is read back on use.
        assert_eq!(rss_kib().map(|k| k > 0), Some(true));
    }
}
