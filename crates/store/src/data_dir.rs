//! `$CARACAL_HOME`: creation with safe modes, the single-process lock, and owner-only files.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "caracal.lock";

/// An open, locked data directory. The lock is held until this value is dropped, so two
/// processes can never write the same embedded store or mint two bootstrap tokens.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    created: bool,
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("data directory {0} exists but is not a directory")]
    NotADirectory(PathBuf),
    #[error(
        "data directory {path} is accessible by other users (mode {mode:04o}); run `chmod 700 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("data directory {path} is in use by another caracal process{}", holder_text(.holder))]
    Locked { path: PathBuf, holder: Option<u32> },
}

fn holder_text(holder: &Option<u32>) -> String {
    holder
        .map(|pid| format!(" (pid {pid})"))
        .unwrap_or_default()
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DataDir {
    /// Creates the directory (mode 0700) if it is missing, refuses one that other users can
    /// reach, and takes the process lock.
    pub fn open(path: &Path) -> Result<DataDir, DataDirError> {
        let created = match fs::metadata(path) {
            Ok(metadata) if !metadata.is_dir() => {
                return Err(DataDirError::NotADirectory(path.to_owned()));
            }
            Ok(metadata) => {
                let mode = metadata.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(DataDirError::TooOpen {
                        path: path.to_owned(),
                        mode,
                    });
                }
                false
            }
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(io_error(path))?;
                // The umask may have narrowed the mode further; it can never widen it.
                true
            }
            Err(error) => return Err(io_error(path)(error)),
        };
        // Reading the directory proves we can use it before any file is touched.
        fs::read_dir(path).map_err(io_error(path))?;

        let lock_path = path.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_error(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = lock.read_to_string(&mut text);
                return Err(DataDirError::Locked {
                    path: path.to_owned(),
                    holder: text.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(error)) => return Err(io_error(&lock_path)(error)),
        }
        lock.set_len(0).map_err(io_error(&lock_path))?;
        write!(lock, "{}", std::process::id()).map_err(io_error(&lock_path))?;

        Ok(DataDir {
            path: path.to_owned(),
            created,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when this start created the directory.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Reads an owner-only file of the data directory, `None` if it does not exist.
    pub fn read_file(&self, name: &str) -> Result<Option<String>, DataDirError> {
        let path = self.path.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(io_error(&path)(error)),
        }
    }

    /// Writes `contents` to `name` with mode 0600, atomically: a temporary file is written,
    /// fsynced and renamed over the target, so a crash leaves the old file or the new one.
    pub fn write_private_file(&self, name: &str, contents: &str) -> Result<(), DataDirError> {
        let path = self.path.join(name);
        let temporary = self.path.join(format!(".{name}.tmp"));
        let result = (|| {
            let _ = fs::remove_file(&temporary);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(contents.as_bytes())?;
            file.sync_all()?;
            fs::rename(&temporary, &path)?;
            File::open(&self.path)?.sync_all()
        })();
        result.map_err(io_error(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_the_directory_owner_only() {
        let parent = tempfile::tempdir().unwrap();
        let home = parent.path().join("nested").join("home");
        let data_dir = DataDir::open(&home).unwrap();
        assert!(data_dir.created());
        assert_eq!(mode(&home), 0o700);
        data_dir.write_private_file("secret", "value").unwrap();
        assert_eq!(mode(&home.join("secret")), 0o600);
        assert_eq!(
            data_dir.read_file("secret").unwrap().as_deref(),
            Some("value")
        );
        assert_eq!(data_dir.read_file("absent").unwrap(), None);
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_lock() {
        let parent = tempfile::tempdir().unwrap();
        let home = parent.path().join("home");
        let first = DataDir::open(&home).unwrap();
        let error = DataDir::open(&home).unwrap_err();
        assert!(
            matches!(error, DataDirError::Locked { holder: Some(pid), .. } if pid == std::process::id()),
            "{error}"
        );
        drop(first);
        assert!(!DataDir::open(&home).unwrap().created());
    }

    #[test]
    fn refuses_directories_other_users_can_reach_and_plain_files() {
        let parent = tempfile::tempdir().unwrap();
        fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let error = DataDir::open(parent.path()).unwrap_err();
        assert!(error.to_string().contains("mode 0755"), "{error}");
        let file = parent.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(matches!(
            DataDir::open(&file),
            Err(DataDirError::NotADirectory(_))
        ));
    }
}
