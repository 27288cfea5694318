//! Batch journals: nothing a long loop over independent batches computed is lost on a crash.
//!
//! The evaluation loops (clean + PGD + AutoAttack per batch, the defence-aware attack, the
//! test-time reversal) and `attack_dataset` walk their images in batches whose results depend
//! only on the batch (its images and a random stream derived from its index), never on the
//! batches before it. Each finished batch is written to the node's scratch folder as one
//! small safetensors file: its counts as JSON (`meta/json`) and, where later phases need them,
//! its tensors (the adversarial images). A run of the same key after a crash, `kill -9` or
//! Ctrl-C replays the finished batches from those files and computes only the rest, so the
//! result is the one an uninterrupted run gives (tested bit for bit). The scratch folder
//! belongs to one node key and is deleted when the node commits.
//!
//! Files: `<scratch>/journal/<part>/<batch>.safetensors`, written atomically
//! ([`checkpoint::save_tensors`]: temporary file, fsync, rename). A file that cannot be read
//! or parsed (a record of an older pipe, a damaged disk) is not trusted: its batch is computed
//! again and the file replaced.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use pipe_stages::journal::Journal;
//! let dir = std::env::temp_dir().join(format!("pipe-journal-doc-{}", std::process::id()));
//! let j = Journal::at(&dir);
//! assert!(j.get::<usize>("eval", 0, |_| true).is_none());
//! j.put("eval", 0, &42usize, &[])?;
//! assert!(j.get::<usize>("eval", 0, |e| e.record == 41).is_none());
//! assert_eq!(j.get::<usize>("eval", 0, |_| true).map(|e| e.record), Some(42));
//! assert_eq!(j.replayed(), 1);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle::{Device, Tensor};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::nn::checkpoint;

/// The name of the JSON record inside a batch file.
const META: &str = "meta/json";

/// Where a loop records its finished batches (or nowhere: [`Journal::off`]).
#[derive(Debug, Default)]
pub struct Journal {
    dir: Option<PathBuf>,
    replayed: AtomicUsize,
}

/// One replayed batch: its record and its tensors (on the CPU).
#[derive(Debug)]
pub struct Entry<T> {
    /// What the loop recorded (counts, sums).
    pub record: T,
    /// The tensors it recorded, by name.
    pub tensors: HashMap<String, Tensor>,
}

impl<T> Entry<T> {
    /// The recorded tensor `name`.
    ///
    /// # Errors
    /// When the batch recorded no such tensor.
    pub fn tensor(&self, name: &str) -> candle::Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| candle::Error::Msg(format!("journal: the batch has no `{name}`")))
    }
}

impl Journal {
    /// A journal that records nothing and replays nothing (library calls, tests).
    pub fn off() -> Self {
        Self::default()
    }

    /// A journal in `<scratch>/journal` (created on the first write).
    pub fn at(scratch: impl AsRef<Path>) -> Self {
        Self {
            dir: Some(scratch.as_ref().join("journal")),
            replayed: AtomicUsize::new(0),
        }
    }

    fn file(&self, part: &str, batch: usize) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(part).join(format!("{batch:07}.safetensors")))
    }

    /// The record of batch `batch` of loop `part`, if a run of this key finished it and
    /// `accept` takes it (the caller checks that it describes this batch). An accepted record
    /// counts as replayed ([`Journal::replayed`]).
    pub fn get<T: DeserializeOwned>(
        &self,
        part: &str,
        batch: usize,
        accept: impl FnOnce(&Entry<T>) -> bool,
    ) -> Option<Entry<T>> {
        let path = self.file(part, batch)?;
        if !path.is_file() {
            return None;
        }
        let mut tensors = candle::safetensors::load(&path, &Device::Cpu).ok()?;
        let meta = tensors.remove(META)?.to_vec1::<u8>().ok()?;
        let entry = Entry {
            record: serde_json::from_slice(&meta).ok()?,
            tensors,
        };
        if !accept(&entry) {
            return None;
        }
        self.replayed.fetch_add(1, Ordering::Relaxed);
        Some(entry)
    }

    /// Records batch `batch` of loop `part` (atomically; tensors are copied to the CPU).
    ///
    /// # Errors
    /// I/O or tensor errors (naming the file).
    pub fn put<T: Serialize>(
        &self,
        part: &str,
        batch: usize,
        record: &T,
        tensors: &[(&str, &Tensor)],
    ) -> candle::Result<()> {
        let Some(path) = self.file(part, batch) else {
            return Ok(());
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                candle::Error::Msg(format!("journal: creating {}: {e}", dir.display()))
            })?;
        }
        let meta = serde_json::to_vec(record)
            .map_err(|e| candle::Error::Msg(format!("journal: encoding a record: {e}")))?;
        let mut t: HashMap<String, Tensor> = HashMap::new();
        t.insert(META.into(), Tensor::new(meta.as_slice(), &Device::Cpu)?);
        for (name, v) in tensors {
            t.insert((*name).to_string(), v.to_device(&Device::Cpu)?);
        }
        checkpoint::save_tensors(&t, &path)
    }

    /// Deletes the records of loop `part` (a phase whose results will not be read again).
    pub fn remove(&self, part: &str) {
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d.join(part));
        }
    }

    /// Whether this journal records (a scratch folder was given).
    pub fn is_on(&self) -> bool {
        self.dir.is_some()
    }

    /// How many batches [`Journal::get`] replayed so far.
    pub fn replayed(&self) -> usize {
        self.replayed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_tensors_and_distrusts_damaged_files() -> candle::Result<()> {
        let tmp = crate::data::testutil::TempDir::new("journal");
        let j = Journal::at(tmp.path());
        let x = Tensor::new(&[[1.5f32, -2.0], [0.25, 7.0]], &Device::Cpu)?;
        j.put("a", 3, &(7usize, vec![1.0f64, 2.5]), &[("adv/0", &x)])?;
        let e = j
            .get::<(usize, Vec<f64>)>("a", 3, |_| true)
            .expect("recorded");
        assert_eq!(e.record, (7, vec![1.0, 2.5]));
        assert_eq!(
            e.tensor("adv/0")?.to_vec2::<f32>()?,
            vec![vec![1.5, -2.0], vec![0.25, 7.0]]
        );
        assert!(e.tensor("adv/1").is_err());
        // other batches, other parts, other record types are not there
        assert!(j.get::<(usize, Vec<f64>)>("a", 2, |_| true).is_none());
        assert!(j.get::<(usize, Vec<f64>)>("b", 3, |_| true).is_none());
        assert!(j.get::<String>("a", 3, |_| true).is_none());
        assert_eq!(j.replayed(), 1);
        // a damaged file is not trusted, and a new record replaces it
        let path = tmp.path().join("journal/a/0000003.safetensors");
        std::fs::write(&path, b"not a safetensors file")?;
        assert!(j.get::<(usize, Vec<f64>)>("a", 3, |_| true).is_none());
        j.put("a", 3, &(8usize, vec![0.0f64]), &[])?;
        assert_eq!(
            j.get::<(usize, Vec<f64>)>("a", 3, |_| true)
                .map(|e| e.record.0),
            Some(8)
        );
        // off: nothing written, nothing replayed
        let off = Journal::off();
        off.put("a", 0, &1usize, &[])?;
        assert!(off.get::<usize>("a", 0, |_| true).is_none() && !off.is_on());
        Ok(())
    }
}
