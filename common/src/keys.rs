//! Ed25519 key files and public key encoding.
//!
//! Private keys are PKCS#8 PEM files (what `openssl genpkey -algorithm ed25519` writes) with
//! mode 0600; public keys are written as standard base64 of their 32 bytes.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};

/// Largest key file we read; a PKCS#8 ed25519 PEM is about 120 bytes.
const MAX_KEY_FILE: u64 = 16 * 1024;

/// Problems with key files and encoded keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// the key file
        path: PathBuf,
        /// what the OS said
        error: std::io::Error,
    },
    /// The key file has permission bits for group or others.
    #[error(
        "{path}: key file is accessible by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions {
        /// the key file
        path: PathBuf,
        /// its mode bits
        mode: u32,
    },
    /// The key file is not a PKCS#8 PEM ed25519 private key.
    #[error("{path}: not a PKCS#8 PEM ed25519 private key ({reason})")]
    Format {
        /// the key file
        path: PathBuf,
        /// why it was refused
        reason: String,
    },
    /// A public key string is not valid.
    #[error("invalid public key: {0}")]
    PublicKey(String),
    /// The OS random source failed.
    #[error("random source failed: {0}")]
    Random(String),
}

/// A public key, shown as base64 and compared by value.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses standard base64 of 32 bytes, refusing weak (small-order) keys.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD
            .decode(s.trim())
            .map_err(|e| KeyError::PublicKey(format!("not base64: {e}")))?;
        let arr: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::PublicKey(format!("expected 32 bytes, got {}", bytes.len())))?;
        let key = VerifyingKey::from_bytes(&arr)
            .map_err(|_| KeyError::PublicKey("not a valid ed25519 point".into()))?;
        if key.is_weak() {
            return Err(KeyError::PublicKey("weak (small-order) key".into()));
        }
        Ok(Self(key))
    }

    /// Standard base64 of the 32 key bytes.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.as_bytes())
    }

    /// The dalek verifying key.
    pub(crate) fn verifying_key(&self) -> &VerifyingKey {
        &self.0
    }

    /// The 32 key bytes (what a signature's `keyid` decodes to).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl<'de> serde::Deserialize<'de> for PublicKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

/// A private key loaded from disk; its Debug output never shows the secret.
#[derive(Clone)]
pub struct PrivateKey(SigningKey);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public={})", self.public())
    }
}

impl PrivateKey {
    /// A fresh key from the OS random source.
    pub fn generate() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&seed)))
    }

    /// A key from its 32-byte secret seed (RFC 8032), for test vectors and tools.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        Self(SigningKey::from_bytes(seed))
    }

    /// The matching public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// The dalek signing key.
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    /// Reads a PKCS#8 PEM key file, refusing files readable by group or others. The checks
    /// are made on the opened file itself, so the file checked is the file read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |error| KeyError::Io {
            path: path.to_owned(),
            error,
        };
        let format = |reason: &str| KeyError::Format {
            path: path.to_owned(),
            reason: reason.into(),
        };
        // Checked before opening too: opening a FIFO would block.
        if !std::fs::metadata(path).map_err(io)?.is_file() {
            return Err(format("not a regular file"));
        }
        let file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(format("not a regular file"));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        Self::read_pem(file, path)
    }

    /// Reads a PKCS#8 PEM key from the inherited file descriptor `fd` (a pipe, or a file that
    /// the parent process opened: its mode is not checked), to its end. A terminal is refused
    /// rather than waited on.
    ///
    /// Descriptor 0 is read as stdin, as it is. Any other is reopened through
    /// `/proc/self/fd/N` (Linux; what `/dev/fd/N` links to), as taking over a raw descriptor
    /// needs `unsafe`: for a pipe that is the same pipe, for a file the same file read from its
    /// start, but the reopening is checked against this process's user, so a pipe or file
    /// that only another user (root) may open must come as stdin.
    pub fn read_fd(fd: u32) -> Result<Self, KeyError> {
        use std::io::IsTerminal;
        let terminal = |path: PathBuf| KeyError::Format {
            path,
            reason: "a terminal, not a key".into(),
        };
        if fd == 0 {
            let path = PathBuf::from("stdin");
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                return Err(terminal(path));
            }
            return Self::read_pem(stdin.lock(), &path);
        }
        let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
        let file = std::fs::File::open(&path).map_err(|error| KeyError::Io {
            path: path.clone(),
            error,
        })?;
        if file.is_terminal() {
            return Err(terminal(path));
        }
        Self::read_pem(file, &path)
    }

    /// Reads at most [`MAX_KEY_FILE`] bytes of PEM text from `source` (named `path` in
    /// errors) and parses it.
    fn read_pem(source: impl std::io::Read, path: &Path) -> Result<Self, KeyError> {
        use std::io::Read;
        let format = |reason: String| KeyError::Format {
            path: path.to_owned(),
            reason,
        };
        let mut text = String::new();
        source
            .take(MAX_KEY_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|error| KeyError::Io {
                path: path.to_owned(),
                error,
            })?;
        if text.len() as u64 > MAX_KEY_FILE {
            return Err(format("file too large".into()));
        }
        if text.trim().is_empty() {
            return Err(format("empty".into()));
        }
        Self::from_pem(&text).map_err(format)
    }

    /// Parses the text of a PKCS#8 PEM key file (what [`PrivateKey::load`] reads); the error
    /// says what is wrong with it.
    pub fn from_pem(text: &str) -> Result<Self, String> {
        SigningKey::from_pkcs8_pem(text)
            .map(Self)
            .map_err(|e| e.to_string())
    }

    /// Writes the key as PKCS#8 PEM to a new file with mode 0600 (never overwrites).
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let io = |error| KeyError::Io {
            path: path.to_owned(),
            error,
        };
        // PKCS#8 v1 (no embedded public key): the form `openssl genpkey` writes and every
        // tool reads.
        let pem = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: self.0.to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(Default::default())
        .map_err(|e| KeyError::Format {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        let written = file
            .write_all(pem.as_bytes())
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            // Leave no half-written key behind.
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io(e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_load_round_trip_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.pem");
        let key = PrivateKey::generate().expect("gen");
        key.write_new(&path).expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = PrivateKey::load(&path).expect("load");
        assert_eq!(back.public(), key.public());
        assert!(key.write_new(&path).is_err(), "must not overwrite");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = PrivateKey::load(&path).expect_err("group-readable");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let seed = [0x5au8; 32];
        let key = PrivateKey::from_seed(&seed);
        let signer = crate::auth::Signer::new(key.clone());
        let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
        let forms = [
            hex.clone(),
            hex.to_uppercase(),
            STANDARD.encode(seed),
            format!("{:?}", &seed[..8]),
            "90, 90, 90".to_owned(),
        ];
        for shown in [format!("{key:?}"), format!("{signer:?}")] {
            assert!(shown.contains(&key.public().to_base64()), "{shown}");
            for secret in &forms {
                assert!(!shown.contains(secret.as_str()), "{shown} shows {secret}");
            }
        }
    }

    #[test]
    fn reads_a_key_from_a_pipe_up_to_the_bound() {
        use std::os::fd::AsRawFd;
        let key = PrivateKey::generate().expect("gen");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.pem");
        key.write_new(&path).expect("write");
        let pem = std::fs::read(&path).expect("read");
        // A pipe holds 64 KiB, so each text is written whole before it is read.
        let through_pipe = |text: &[u8]| {
            let (reader, mut writer) = std::io::pipe().expect("pipe");
            writer.write_all(text).expect("write to the pipe");
            drop(writer);
            let fd = u32::try_from(reader.as_raw_fd()).expect("fd");
            PrivateKey::read_fd(fd)
        };
        let back = through_pipe(&pem).expect("key from a pipe");
        assert_eq!(back.public(), key.public());

        // At the bound the text is read and parsed (and refused: PEM allows no padding);
        // one byte more is not read.
        let mut padded = pem.clone();
        padded.resize(MAX_KEY_FILE as usize, b'\n');
        let err = through_pipe(&padded).expect_err("padded");
        assert!(!err.to_string().ends_with("(file too large)"), "{err}");
        padded.push(b'\n');
        let err = through_pipe(&padded).expect_err("past the bound");
        assert!(err.to_string().ends_with("(file too large)"), "{err}");

        let err = through_pipe(b"not a key").expect_err("garbage");
        assert!(matches!(err, KeyError::Format { .. }), "{err}");
        let err = through_pipe(b"").expect_err("nothing");
        assert!(err.to_string().ends_with("(empty)"), "{err}");
    }

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let err = PrivateKey::load(dir.path()).expect_err("a folder");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn rejects_garbage_key_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("k.pem");
        std::fs::write(&path, "not a key").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert!(matches!(
            PrivateKey::load(&path),
            Err(KeyError::Format { .. })
        ));
    }

    #[test]
    fn public_key_base64() {
        let key = PrivateKey::generate().expect("gen").public();
        assert_eq!(
            PublicKey::from_base64(&key.to_base64()).expect("parse"),
            key
        );
        assert!(PublicKey::from_base64("abc").is_err());
        assert!(PublicKey::from_base64(&STANDARD.encode([0u8; 31])).is_err());
        // The identity point is a small-order key.
        let mut ident = [0u8; 32];
        ident[0] = 1;
        assert!(PublicKey::from_base64(&STANDARD.encode(ident)).is_err());
    }
}
