//! A stamp of a SQLite database's committed state, read from its WAL index without a query.
//!
//! In WAL mode every connection, in every process, shares the `-shm` file: the WAL index,
//! whose 48-byte header (<https://www.sqlite.org/walformat.html>) changes with every commit
//! (`iChange`, `mxFrame`, the salts after a checkpoint restarts the WAL) and not with reads.
//! SQLite writes the header twice, the second copy first; a reader that finds both copies equal
//! has a header no writer was halfway through. Reading 96 bytes from the page cache costs a
//! system call, against a round trip through a connection for `PRAGMA data_version`.
//!
//! The `-shm` file is deleted when the last connection to the database closes and created
//! anew by the next one; each read checks that the path still names the file held open, and
//! reopens it otherwise.

use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

/// See the module documentation.
pub(crate) struct WalStamp {
    path: PathBuf,
    file: parking_lot::Mutex<Option<(std::fs::File, u64)>>,
}

impl WalStamp {
    /// The stamp of the database file at `db`.
    pub(crate) fn new(db: &Path) -> Self {
        let mut path = db.as_os_str().to_owned();
        path.push("-shm");
        WalStamp {
            path: PathBuf::from(path),
            file: parking_lot::Mutex::new(None),
        }
    }

    /// The header's hash; `None` when the index cannot be read or a writer was midway.
    pub(crate) fn read(&self) -> Option<u128> {
        let ino = std::fs::metadata(&self.path).ok()?.ino();
        let mut held = self.file.lock();
        if held.as_ref().is_none_or(|(_, i)| *i != ino) {
            let f = std::fs::File::open(&self.path).ok()?;
            let opened = f.metadata().ok()?.ino();
            *held = Some((f, opened));
        }
        let (file, _) = held.as_ref()?;
        let mut header = [0u8; 96];
        file.read_exact_at(&mut header, 0).ok()?;
        let (first, second) = header.split_at(48);
        // Byte 12 is `isInit`: 0 while the index is being built.
        (first == second && first[12] == 1).then(|| xxhash_rust::xxh3::xxh3_128(first))
    }
}
