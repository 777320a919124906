//! Gives the kernel back the pages of start-up code once the sidecar is serving.
//!
//! Configuration parsing, certificate validation, the first login and the CLI touch most of the
//! 11 MB of machine code in the binary once; the kernel then keeps those file pages mapped (and
//! charged to the pod) although the request path uses a small part of them. Once every tenant
//! has a session, [`page_out_executable`] asks the kernel to reclaim the executable's read-only
//! mappings (`madvise(MADV_PAGEOUT)`, Linux ≥ 5.4); the code the proxy keeps running is faulted
//! back from the page cache on first use. Nothing is written anywhere: the pages are clean file
//! pages, and the writable or relocated ones are left alone.

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
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let before_kib = rss_kib()?;
    for (start, end) in readonly_ranges(&maps, exe) {
        page_out(start, end);
    }
    Some(Trimmed {
        before_kib,
        after_kib: rss_kib()?,
    })
}

/// `[start, end)` of each mapping of `path` that is not writable, from `/proc/self/maps` text.
pub fn readonly_ranges<'a>(
    maps: &'a str,
    path: &'a str,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    maps.lines().filter_map(move |line| {
        let mut fields = line.split_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let name = fields.nth(3)?;
        if name != path || perms.contains('w') {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        Some((
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        ))
    })
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
    fn only_readonly_mappings_of_the_executable() {
        let maps = "\
5654f9fd0000-5654fa449000 r--p 00000000 fe:00 10010625                   /usr/bin/finhub-sidecar
5654fa449000-5654faf3d000 r-xp 00478000 fe:00 10010625                   /usr/bin/finhub-sidecar
5654fafcb000-5654fafd1000 rw-p 00ff8000 fe:00 10010625                   /usr/bin/finhub-sidecar
7f0000000000-7f0000001000 r-xp 00000000 fe:00 42                         /usr/lib/libc.so.6
7f0000002000-7f0000003000 rw-p 00000000 00:00 0
";
        let r: Vec<_> = readonly_ranges(maps, "/usr/bin/finhub-sidecar").collect();
        assert_eq!(
            r,
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
