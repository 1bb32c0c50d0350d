//! Files the server and its tools write: explicit modes whatever the umask, names that
//! cannot leave their directory, and private keys that nobody else can read.
//!
//! | what | mode |
//! |---|---|
//! | a directory holding private keys (the data directory, `ca/`, `dtls/`, `manufacturers/`, a minted device's directory) | 0700 |
//! | any other directory we create (`factory mint --out`) | 0755 |
//! | a private key, the store | 0600 |
//! | a certificate, the configuration, `fleet.json` | 0644 |
//!
//! Directories that already exist are never re-moded: only the ones created here get a
//! mode, so `--out ..` can never chmod a parent the user owns for other reasons.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Component, Path};

use anyhow::{bail, Context, Result};

/// Mode of a private key file and of the store.
pub const PRIVATE_FILE: u32 = 0o600;
/// Mode of a certificate, the configuration and other public files.
pub const PUBLIC_FILE: u32 = 0o644;
/// Mode of a directory holding private keys.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of any other directory created by us.
pub const PUBLIC_DIR: u32 = 0o755;

/// Longest device serial accepted where a serial names a file or directory.
pub const MAX_SERIAL_LEN: usize = 64;

/// Write `contents` to `path` (created or truncated) with exactly `mode`, then fsync.
/// The mode is set on the open file before any byte is written, so a private key is never
/// readable by others, not even for an instant, whatever the umask.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Creation mode: the umask can only narrow it, and the next call sets it exactly.
        opts.mode(mode & PRIVATE_FILE);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    set_mode_of(&f, path, mode)?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(unix)]
fn set_mode_of(f: &fs::File, path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))
}

#[cfg(not(unix))]
fn set_mode_of(_f: &fs::File, _path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}

/// Set `path`'s mode exactly (for files another library created, e.g. the SQLite store).
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Create `path` and any missing parents, each new one with exactly `mode`. Directories that
/// already exist keep their mode.
pub fn create_dir(path: &Path, mode: u32) -> Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            create_dir(parent, mode)?;
        }
    }
    let mut builder = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(mode & PRIVATE_DIR);
    }
    match builder.create(path) {
        Ok(()) => set_mode(path, mode),
        // Lost a race with another creator: fine if it is a directory now.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Check a device serial that will name a file or directory: 1 to [`MAX_SERIAL_LEN`]
/// printable ASCII characters, none of them a path separator, and not `.` or `..`.
pub fn validate_serial(serial: &str) -> Result<()> {
    if serial.is_empty() {
        bail!("empty serial number");
    }
    if serial.len() > MAX_SERIAL_LEN {
        bail!(
            "serial number is {} bytes long; at most {MAX_SERIAL_LEN} are allowed",
            serial.len()
        );
    }
    if let Some(c) = serial.chars().find(|c| !c.is_ascii_graphic()) {
        bail!("serial number {serial:?} contains {c:?}; only printable ASCII without spaces is allowed");
    }
    if let Some(c) = serial.chars().find(|c| matches!(c, '/' | '\\')) {
        bail!("serial number {serial:?} contains the path separator {c:?}");
    }
    if serial == "." || serial == ".." {
        bail!("serial number {serial:?} names a directory, not a device");
    }
    // Belt and braces: whatever the rules above, the name must be one plain component.
    let mut comps = Path::new(serial).components();
    match (comps.next(), comps.next()) {
        (Some(Component::Normal(_)), None) => Ok(()),
        _ => bail!("serial number {serial:?} is not a plain file name"),
    }
}

/// Refuse a private key that group or others may read (or write), unless `allow_insecure`.
pub fn check_key_permissions(path: &Path, allow_insecure: bool) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            if allow_insecure {
                tracing::warn!(file = %path.display(), mode = format!("{mode:o}"),
                    "private key file is accessible to group or others (allowed by --allow-insecure-key-permissions)");
            } else {
                bail!(
                    "private key {} has mode {mode:o}: group or others can access it. \
                     Run `chmod 600 {}`, or start with --allow-insecure-key-permissions",
                    path.display(),
                    path.display()
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, allow_insecure);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_that_could_leave_the_directory_are_refused() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "../../x",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "has space",
            "tab\t",
            "nul\0",
            "é",
            &"9".repeat(MAX_SERIAL_LEN + 1),
        ] {
            assert!(validate_serial(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["SN0001", "A-1_b.c", "...x", &"9".repeat(MAX_SERIAL_LEN)] {
            validate_serial(good).unwrap_or_else(|e| panic!("{good:?} refused: {e}"));
        }
    }
}
