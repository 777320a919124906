//! Reading the files the sidecar reads at run time (certificates, keys, CA bundles, password
//! and secret files, encryption keys, the config): regular files only, opened without
//! blocking, at most [`MAX_FILE_BYTES`].
//!
//! A FIFO at a certificate path would block the reader until a writer shows up (the reloader
//! would hang for good), and `/dev/zero` or a huge file would be read whole into memory. Symlinks
//! are followed (Kubernetes secret volumes swap a `..data` symlink), and the type is checked on
//! the opened file, so a swap between the check and the read cannot slip a FIFO in.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// The largest file read: certificate chains, keys and secrets are a few KiB.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Permission bits a secret file should not have: writable by its group, or any access by
/// others (group-readable is fine: Kubernetes `defaultMode: 0440` with an `fsGroup`).
const LOOSE_SECRET_BITS: u32 = 0o027;

/// Reads `path` whole: a regular file (after following symlinks) of at most
/// [`MAX_FILE_BYTES`]; anything else is an error saying what was found.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let (mut file, meta) = open_regular(path)?;
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0).min(64 * 1024));
    // The size was checked on open; a file growing meanwhile is still cut at the cap + 1.
    (&mut file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok(bytes)
}

/// [`read`] as UTF-8 text.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    String::from_utf8(read(path)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// The file's permission bits when they are looser than a secret file's should be (writable by
/// its group, or readable or writable by others), as ssh warns about private keys; `None` when
/// they are fine or the file cannot be looked at.
pub fn loose_secret_mode(path: &Path) -> Option<u32> {
    let mode = std::fs::metadata(path).ok()?.mode() & 0o7777;
    (mode & LOOSE_SECRET_BITS != 0).then_some(mode)
}

/// A warning for a secret file at `path` named by config key `key` whose mode is too open;
/// names the key, the path and the mode, never the content.
pub fn loose_secret_warning(key: &str, path: &Path) -> Option<String> {
    loose_secret_mode(path).map(|mode| {
        format!(
            "{key}: {} has mode {mode:04o}: other users can read or change it (use 0600 or 0440)",
            path.display()
        )
    })
}

/// Opens `path` without blocking (a FIFO opens at once) and checks that it is a regular file
/// of at most [`MAX_FILE_BYTES`].
fn open_regular(path: &Path) -> io::Result<(File, Metadata)> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    let what = if kind.is_file() {
        None
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else if kind.is_dir() {
        Some("a directory")
    } else {
        Some("not a regular file")
    };
    if let Some(what) = what {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file"),
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_large());
    }
    Ok((file, meta))
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("larger than {} KiB", MAX_FILE_BYTES / 1024),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_regular_file_and_a_symlink_to_one_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cert.pem");
        std::fs::write(&f, b"pem").unwrap();
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(read(&f).unwrap(), b"pem");
        assert_eq!(read_to_string(&link).unwrap(), "pem");
    }

    #[test]
    fn a_fifo_is_refused_at_once_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("cert.pem");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo has no other memory effects.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read(&fifo).unwrap_err();
        assert!(e.to_string().contains("a FIFO"), "{e}");
    }

    #[test]
    fn devices_directories_and_large_files_are_refused() {
        let e = read(Path::new("/dev/zero")).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path())
            .unwrap_err()
            .to_string()
            .contains("directory"));
        let big = dir.path().join("big.pem");
        let f = File::create(&big).unwrap();
        f.set_len(MAX_FILE_BYTES + 1).unwrap();
        assert!(read(&big).unwrap_err().to_string().contains("larger than"));
        f.set_len(MAX_FILE_BYTES).unwrap();
        assert_eq!(read(&big).unwrap().len() as u64, MAX_FILE_BYTES);
    }

    #[test]
    fn loose_modes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("password");
        std::fs::write(&f, b"x").unwrap();
        for (mode, loose) in [
            (0o600, false),
            (0o440, false),
            (0o400, false),
            (0o640, false),
            (0o644, true),
            (0o660, true),
            (0o666, true),
            (0o604, true),
        ] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(loose_secret_mode(&f).is_some(), loose, "{mode:o}");
        }
        let w = loose_secret_warning("tenants[0].password_file", &f).unwrap();
        assert!(
            w.contains("tenants[0].password_file") && w.contains("0604"),
            "{w}"
        );
    }
}
