//! Files the server keeps in its data directory (the SQLite database, private keys) are this
//! user's alone: directories mode 0700, files mode 0600, whatever the umask.

use std::fs;
use std::io;
use std::path::Path;

/// Creates `dir` (and its parents) if needed and makes it readable by this user only (mode
/// 0700): it holds the database and private keys.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Creates `path` empty if it does not exist, and makes it readable by this user only (mode
/// 0600). SQLite gives its WAL and shared-memory files the database file's mode.
pub fn private_file(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

/// Writes `contents` to `path`, readable by this user only (mode 0600).
pub fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // A file that existed before keeps its mode through `open`: set it.
    fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(contents.as_bytes())
}
