//! `Manifest`: the `manifest.json` written last into every committed entry.
//!
//! The engine supplies a [`ManifestMeta`] (what ran, on what, when); the store
//! adds the schema, the key, the status and the hash of every file when it
//! commits. A directory under `entries/` whose `manifest.json` parses, names
//! the directory's key and lists only safe relative paths is a valid entry.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::key::Key;

/// Version of the manifest format; bump when fields change meaning.
pub const MANIFEST_SCHEMA: u32 = 1;

/// File name of the manifest inside an entry directory.
pub(crate) const MANIFEST_FILE: &str = "manifest.json";

/// Hash and size of one committed file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// blake3 of the contents, 64 lowercase hex characters.
    pub blake3: String,
    /// Size in bytes.
    pub bytes: u64,
}

/// What the engine knows about a finished node; the store adds key, schema and files.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ManifestMeta {
    /// Stage kind name.
    pub kind: String,
    /// Stage kind version.
    pub version: u32,
    /// Display id of the node that produced the entry (informational only).
    pub node: String,
    /// Resolved parameters.
    pub params: serde_json::Value,
    /// Input slot -> keys of the upstream entries.
    pub inputs: BTreeMap<String, Vec<Key>>,
    /// Relative path of an external input file -> its blake3 hex.
    pub external: BTreeMap<String, String>,
    /// Start time, RFC 3339 UTC.
    pub started: String,
    /// End time, RFC 3339 UTC.
    pub finished: String,
    /// Wall-clock duration in seconds (must be finite).
    pub seconds: f64,
    /// Host name of the producing machine.
    pub host: String,
    /// Version of the `pipe` binary that produced the entry.
    pub pipe_version: String,
    /// Anything else the engine wants to record.
    #[serde(default)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The full contents of an entry's `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`MANIFEST_SCHEMA`] at commit time.
    pub schema: u32,
    /// The entry's key; must match the directory it lives in.
    pub key: Key,
    /// Always `"ok"`: failed runs never commit.
    pub status: String,
    /// Engine-provided metadata, flattened into the same JSON object.
    #[serde(flatten)]
    pub meta: ManifestMeta,
    /// Relative path (with `/` separators, `manifest.json` excluded) -> hash and size.
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    /// Checks what [`Store::get`](crate::Store::get) relies on; returns the reason on failure.
    pub(crate) fn check(&self, key: &Key) -> std::result::Result<(), String> {
        if self.schema != MANIFEST_SCHEMA {
            return Err(format!(
                "manifest schema is {}, expected {MANIFEST_SCHEMA}",
                self.schema
            ));
        }
        if self.key != *key {
            return Err(format!("manifest names key {}, expected {}", self.key, key));
        }
        if self.status != "ok" {
            return Err(format!(
                "manifest status is {:?}, expected \"ok\"",
                self.status
            ));
        }
        for (name, fe) in &self.files {
            if !is_safe_rel_path(name) || name == MANIFEST_FILE {
                return Err(format!("manifest lists an unsafe file name {name:?}"));
            }
            if fe.blake3.len() != 64 || !fe.blake3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "file {name:?} has an invalid blake3 {:?}",
                    fe.blake3
                ));
            }
        }
        Ok(())
    }
}

/// A relative path with `/` separators that cannot leave its directory.
pub(crate) fn is_safe_rel_path(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\0')
        && !name.contains('\\')
        && name
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The current UTC time as RFC 3339 with milliseconds, e.g. `2026-11-23T07:22:19.123Z`.
pub fn now_rfc3339() -> String {
    // A clock before 1970 is a broken machine; report the epoch rather than fail.
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_rfc3339(d.as_secs(), d.subsec_millis())
}

/// Formats seconds since the Unix epoch plus milliseconds as RFC 3339 UTC.
pub(crate) fn format_rfc3339(secs: u64, millis: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 -> (year, month, day) in the proleptic Gregorian calendar.
///
/// Howard Hinnant's `civil_from_days`, restricted to non-negative day counts:
/// shift the epoch to 0000-03-01 so leap days fall at the end of a 400-year era.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        // Reference values from `date -u -d @<secs> +%Y-%m-%dT%H:%M:%S`.
        assert_eq!(format_rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_rfc3339(951_868_799, 999), "2000-02-29T23:59:59.999Z");
        assert_eq!(format_rfc3339(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339(1_795_418_539, 123),
            "2026-11-23T07:22:19.123Z"
        );
        assert_eq!(format_rfc3339(1_709_251_199, 0), "2024-02-29T23:59:59.000Z");
    }

    #[test]
    fn now_has_rfc3339_shape() {
        let s = now_rfc3339();
        assert_eq!(s.len(), 24, "{s}");
        assert!(s.ends_with('Z'));
        assert_eq!(&s[4..5], "-");
        assert_eq!(&s[10..11], "T");
        assert_eq!(&s[19..20], ".");
        assert!(s.as_str() >= "2024");
    }

    #[test]
    fn civil_matches_day_by_day_walk() {
        // Walk 200 years one day at a time with a naive calendar.
        let mut ymd = (1970u64, 1u64, 1u64);
        for days in 0..(200 * 366) {
            assert_eq!(civil_from_days(days), ymd, "day {days}");
            let (y, m, d) = ymd;
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let len = match m {
                2 if leap => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            ymd = if d < len {
                (y, m, d + 1)
            } else if m < 12 {
                (y, m + 1, 1)
            } else {
                (y + 1, 1, 1)
            };
        }
    }

    fn sample() -> Manifest {
        let key = Key::from_hash(blake3::hash(b"k"));
        let mut inputs = BTreeMap::new();
        inputs.insert("data".to_string(), vec![Key::from_hash(blake3::hash(b"d"))]);
        let mut files = BTreeMap::new();
        files.insert(
            "sub/a.bin".to_string(),
            FileEntry {
                blake3: blake3::hash(b"a").to_hex().to_string(),
                bytes: 1,
            },
        );
        Manifest {
            schema: MANIFEST_SCHEMA,
            key,
            status: "ok".into(),
            meta: ManifestMeta {
                kind: "echo".into(),
                version: 3,
                node: "n[x=1]".into(),
                params: serde_json::json!({"x": 1}),
                inputs,
                seconds: 1.5,
                ..ManifestMeta::default()
            },
            files,
        }
    }

    #[test]
    fn json_round_trip_is_flat() -> Result<(), serde_json::Error> {
        let m = sample();
        let v = serde_json::to_value(&m)?;
        assert_eq!(v["kind"], "echo");
        assert_eq!(v["schema"], 1);
        assert_eq!(v["key"], m.key.hex());
        assert_eq!(v["inputs"]["data"][0], blake3::hash(b"d").to_hex().as_str());
        let back: Manifest = serde_json::from_value(v)?;
        assert_eq!(back, m);
        Ok(())
    }

    #[test]
    fn check_rejects_bad_manifests() {
        let m = sample();
        assert_eq!(m.check(&m.key), Ok(()));
        assert!(m.check(&Key::from_bytes([0; 32])).is_err());
        for bad in ["../x", "/abs", "a//b", "./a", "a/..", "", "manifest.json"] {
            let mut m2 = sample();
            m2.files.insert(
                bad.to_string(),
                FileEntry {
                    blake3: "0".repeat(64),
                    bytes: 0,
                },
            );
            assert!(m2.check(&m2.key).is_err(), "{bad:?} accepted");
        }
        let mut m3 = sample();
        m3.status = "failed".into();
        assert!(m3.check(&m3.key).is_err());
    }
}
