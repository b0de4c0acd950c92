//! Precompiled plugins on disk, keyed by the component's SHA-256 and the
//! engine's compatibility hash, so a restart does not compile again.
//!
//! A precompiled artifact is native code that is run as it is, so the cache
//! is trusted only as far as it can be checked:
//! - the directory belongs to this process's user and has no group or other
//!   permission bits (created 0700 when missing); otherwise it is not used;
//! - it holds a random key (`key`, 0600, same owner) made when the cache is
//!   first used;
//! - each artifact carries an HMAC-SHA256 with that key over the component's
//!   hash, the engine's compatibility hash and the artifact's bytes, checked
//!   before the bytes are loaded. An artifact that fails the check (planted,
//!   truncated, made for other bytes) is compiled again and overwritten.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Name of the key file in the cache directory.
const KEY_FILE: &str = "key";
const KEY_LEN: usize = 32;
/// First bytes of every artifact file; the format's version.
const MAGIC: &[u8; 8] = b"WHCWASM1";
const TAG_LEN: usize = 32;
/// Largest artifact file read back; a larger one is compiled again.
const MAX_ARTIFACT: u64 = 1 << 30;

/// Compiles `bytes`, or loads the artifact a compatible engine made from the
/// same bytes and this cache authenticated. Returns the component and the
/// bytes' hash.
pub(super) fn compile(
    engine: &Engine,
    dir: Option<&Path>,
    bytes: &[u8],
) -> anyhow::Result<(Component, String)> {
    compile_as(engine, dir, bytes, euid())
}

fn compile_as(
    engine: &Engine,
    dir: Option<&Path>,
    bytes: &[u8],
    owner: u32,
) -> anyhow::Result<(Component, String)> {
    let digest: [u8; 32] = Sha256::digest(bytes).into();
    let hash = hex::encode(digest);
    let Some(cache) = dir.and_then(|d| Cache::open(d, owner)) else {
        return Ok((Component::from_binary(engine, bytes)?, hash));
    };
    let compat = compatibility(engine);
    let file = cache
        .dir
        .join(format!("{hash}-{}.cwasm", hex::encode(&compat[..8])));
    match cache.read(&file, &digest, &compat) {
        Ok(Some(artifact)) => {
            // SAFETY: the bytes carry this cache's HMAC over themselves, this
            // component's hash and this engine's compatibility hash: they are
            // what `precompile_component` wrote for these component bytes,
            // and they were read into memory before the check, so what was
            // checked is what is loaded.
            match unsafe { Component::deserialize(engine, &artifact[MAGIC.len() + TAG_LEN..]) } {
                Ok(component) => return Ok((component, hash)),
                Err(e) => tracing::debug!(
                    file = %file.display(), error = %e,
                    "cached plugin not loadable; compiling it again"
                ),
            }
        }
        Ok(None) => {}
        Err(reason) => tracing::debug!(
            file = %file.display(), reason,
            "cached plugin not used; compiling it again"
        ),
    }
    let compiled = engine.precompile_component(bytes)?;
    // SAFETY: these bytes were produced by `precompile_component` just now.
    let component = unsafe { Component::deserialize(engine, &compiled)? };
    if let Err(e) = cache.write(&file, &digest, &compat, &compiled) {
        tracing::warn!(dir = %cache.dir.display(), error = %e, "cannot cache compiled plugin");
    }
    Ok((component, hash))
}

/// A cache directory that passed the checks, and its key.
struct Cache {
    dir: PathBuf,
    key: [u8; KEY_LEN],
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// The cache in `dir`, created when missing; None (with a warning, once
    /// per directory) when it cannot be trusted or used.
    fn open(dir: &Path, owner: u32) -> Option<Cache> {
        match Cache::try_open(dir, owner) {
            Ok(cache) => Some(cache),
            Err(reason) => {
                warn_once(dir, &reason);
                None
            }
        }
    }

    fn try_open(dir: &Path, owner: u32) -> Result<Cache, String> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("cannot create it: {e}"))?;
        }
        let meta = std::fs::metadata(dir).map_err(|e| format!("cannot read it: {e}"))?;
        if !meta.is_dir() {
            return Err("not a directory".into());
        }
        trusted(&meta, owner)?;
        let key = load_key(dir, owner)?;
        Ok(Cache {
            dir: dir.to_path_buf(),
            key,
        })
    }

    fn tag(&self, component: &[u8; 32], compat: &[u8; 32], artifact: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any length");
        mac.update(MAGIC);
        mac.update(component);
        mac.update(compat);
        mac.update(artifact);
        mac
    }

    /// The whole file (magic, tag, artifact) when its tag is right; None
    /// when there is no file; Err with the reason it is not used.
    fn read(
        &self,
        file: &Path,
        component: &[u8; 32],
        compat: &[u8; 32],
    ) -> Result<Option<Vec<u8>>, &'static str> {
        let mut f = match File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(_) => return Err("cannot open it"),
        };
        let len = f.metadata().map_err(|_| "cannot read it")?.len();
        if len > MAX_ARTIFACT {
            return Err("too large");
        }
        let mut data = Vec::with_capacity(len as usize);
        f.read_to_end(&mut data).map_err(|_| "cannot read it")?;
        if data.len() < MAGIC.len() + TAG_LEN || &data[..MAGIC.len()] != MAGIC {
            return Err("not written by this cache (no tag)");
        }
        let (tag, artifact) = data[MAGIC.len()..].split_at(TAG_LEN);
        // verify_slice compares in constant time.
        self.tag(component, compat, artifact)
            .verify_slice(tag)
            .map_err(|_| "its tag does not verify")?;
        Ok(Some(data))
    }

    /// Writes magic, tag and artifact to a private temporary file, then
    /// renames it over `file`.
    fn write(
        &self,
        file: &Path,
        component: &[u8; 32],
        compat: &[u8; 32],
        artifact: &[u8],
    ) -> std::io::Result<()> {
        let tag = self
            .tag(component, compat, artifact)
            .finalize()
            .into_bytes();
        let tmp = self.dir.join(format!(".{}.tmp", ulid::Ulid::new()));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&tag)?;
            f.write_all(artifact)?;
            std::fs::rename(&tmp, file)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }
}

/// Owned by `owner` and no permission bits for group or others.
fn trusted(meta: &std::fs::Metadata, owner: u32) -> Result<(), String> {
    if meta.uid() != owner {
        return Err(format!(
            "owned by uid {}, not by this process's user (uid {owner})",
            meta.uid()
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "mode {mode:o} gives access to other users (needs 700 for a directory, 600 for the key)"
        ));
    }
    Ok(())
}

/// Reads the cache's key, or makes it when there is none: written to a
/// private temporary file, then linked into place, so a second process never
/// reads half a key and never replaces one.
fn load_key(dir: &Path, owner: u32) -> Result<[u8; KEY_LEN], String> {
    let path = dir.join(KEY_FILE);
    match read_key(&path, owner) {
        Ok(Some(key)) => return Ok(key),
        Ok(None) => {}
        Err(reason) => return Err(format!("key file {}: {reason}", path.display())),
    }
    let mut key = [0u8; KEY_LEN];
    rand::rng().fill_bytes(&mut key);
    let tmp = dir.join(format!(".key.{}.tmp", ulid::Ulid::new()));
    let made = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&key)?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, &path)
    })();
    let _ = std::fs::remove_file(&tmp);
    match made {
        Ok(()) => Ok(key),
        // Another process made it first: use theirs.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_key(&path, owner) {
            Ok(Some(key)) => Ok(key),
            Ok(None) => Err(format!("key file {} vanished", path.display())),
            Err(reason) => Err(format!("key file {}: {reason}", path.display())),
        },
        Err(e) => Err(format!("cannot create key file {}: {e}", path.display())),
    }
}

/// The key, when the file exists, is a regular file (not a link), belongs to
/// `owner`, is readable by no one else and holds exactly a key.
fn read_key(path: &Path, owner: u32) -> Result<Option<[u8; KEY_LEN]>, String> {
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it (a symbolic link?): {e}")),
    };
    let meta = f.metadata().map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    trusted(&meta, owner)?;
    if meta.len() != KEY_LEN as u64 {
        return Err(format!("holds {} bytes, not {KEY_LEN}", meta.len()));
    }
    let mut key = [0u8; KEY_LEN];
    f.read_exact(&mut key)
        .map_err(|e| format!("cannot read it: {e}"))?;
    Ok(Some(key))
}

/// The engine's compatibility hash as SHA-256: artifacts of an engine with
/// other settings or another wasmtime version get other names and tags.
fn compatibility(engine: &Engine) -> [u8; 32] {
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut h = Sha(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    h.0.finalize().into()
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Warns about a cache directory that is not used, once per directory.
fn warn_once(dir: &Path, reason: &str) {
    static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if warned
        .get_or_insert_with(HashSet::new)
        .insert(dir.to_path_buf())
    {
        tracing::warn!(
            dir = %dir.display(), reason,
            "plugin cache directory not used; plugins are compiled on every load"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component that imports one function named `name`: two names, two
    /// components whose compiled code differs.
    fn component(name: &str) -> Vec<u8> {
        assert!(name.len() < 64);
        let mut c = b"\0asm\x0d\x00\x01\x00".to_vec();
        // Type section: one function type, no parameters, no result.
        c.extend([7, 5, 1, 0x40, 0, 1, 0]);
        // Import section: `name` as that function.
        let mut import = vec![1, 0, name.len() as u8];
        import.extend(name.as_bytes());
        import.extend([1, 0]);
        c.push(10);
        c.push(import.len() as u8);
        c.extend(import);
        c
    }

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    fn imports(engine: &Engine, c: &Component) -> Vec<String> {
        c.component_type()
            .imports(engine)
            .map(|(n, _)| n.to_string())
            .collect()
    }

    fn artifacts(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .collect();
        files.sort();
        files
    }

    fn private_dir() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        (tmp, dir)
    }

    #[test]
    fn the_directory_and_key_are_private_and_a_restart_loads_the_artifact() {
        let engine = engine();
        let (_tmp, dir) = private_dir();
        let (c, hash) = compile(&engine, Some(&dir), &component("own")).unwrap();
        assert_eq!(imports(&engine, &c), ["own"]);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "the directory is created private");
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600, "the key file is 0600");
        assert_eq!(
            std::fs::metadata(dir.join(KEY_FILE)).unwrap().len(),
            KEY_LEN as u64
        );
        let files = artifacts(&dir);
        assert_eq!(files.len(), 1);
        assert!(
            files[0]
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&hash)
        );
        assert_eq!(mode(&files[0]), 0o600);
        let written = std::fs::read(&files[0]).unwrap();
        assert!(written.starts_with(MAGIC));

        // Loaded again, not rewritten: the same bytes, the same component.
        let (again, _) = compile(&engine, Some(&dir), &component("own")).unwrap();
        assert_eq!(imports(&engine, &again), ["own"]);
        assert_eq!(std::fs::read(&files[0]).unwrap(), written);
    }

    #[test]
    fn a_planted_artifact_is_not_loaded_and_is_replaced() {
        let engine = engine();
        let (_tmp, dir) = private_dir();
        compile(&engine, Some(&dir), &component("own")).unwrap();
        let own = artifacts(&dir).remove(0);
        let genuine = std::fs::read(&own).unwrap();

        // The compiled code of another component, raw (no tag) or under a
        // tag of garbage, placed under this component's file name.
        let other = engine.precompile_component(&component("other")).unwrap();
        let mut garbage_tag = MAGIC.to_vec();
        garbage_tag.extend([7u8; TAG_LEN]);
        garbage_tag.extend(&other);
        for planted in [other.clone(), garbage_tag] {
            std::fs::write(&own, &planted).unwrap();
            let (c, _) = compile(&engine, Some(&dir), &component("own")).unwrap();
            assert_eq!(
                imports(&engine, &c),
                ["own"],
                "its own code, not the planted one"
            );
            let rewritten = std::fs::read(&own).unwrap();
            assert_ne!(rewritten, planted, "overwritten");
            assert_eq!(rewritten, genuine, "with a genuine artifact");
        }

        // A genuine artifact of the other component, tagged with this cache's
        // key, is bound to the other component's hash: not accepted either.
        compile(&engine, Some(&dir), &component("other")).unwrap();
        let other_file = artifacts(&dir).into_iter().find(|p| *p != own).unwrap();
        std::fs::copy(&other_file, &own).unwrap();
        let (c, _) = compile(&engine, Some(&dir), &component("own")).unwrap();
        assert_eq!(imports(&engine, &c), ["own"]);
        assert_eq!(std::fs::read(&own).unwrap(), genuine);
    }

    #[test]
    fn an_artifact_tagged_with_another_key_is_not_loaded() {
        let engine = engine();
        let (_tmp, dir) = private_dir();
        compile(&engine, Some(&dir), &component("own")).unwrap();
        let own = artifacts(&dir).remove(0);
        // Someone else's cache with its own key.
        let (_tmp2, theirs) = private_dir();
        compile(&engine, Some(&theirs), &component("other")).unwrap();
        let mut forged = std::fs::read(artifacts(&theirs).remove(0)).unwrap();
        // Same name, their key: even retagged for our component's hash it
        // cannot verify without our key.
        let cache = Cache::try_open(&theirs, euid()).unwrap();
        let digest: [u8; 32] = Sha256::digest(component("own")).into();
        let compat = compatibility(&engine);
        let tag = cache
            .tag(&digest, &compat, &forged[MAGIC.len() + TAG_LEN..])
            .finalize()
            .into_bytes();
        forged[MAGIC.len()..MAGIC.len() + TAG_LEN].copy_from_slice(&tag);
        std::fs::write(&own, &forged).unwrap();
        let (c, _) = compile(&engine, Some(&dir), &component("own")).unwrap();
        assert_eq!(imports(&engine, &c), ["own"]);
        assert_ne!(std::fs::read(&own).unwrap(), forged);
    }

    #[test]
    fn an_open_or_foreign_directory_is_not_used() {
        let engine = engine();
        let (_tmp, dir) = private_dir();
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (c, _) = compile(&engine, Some(&dir), &component("own")).unwrap();
        assert_eq!(imports(&engine, &c), ["own"], "still compiled");
        assert!(
            std::fs::read_dir(&dir).unwrap().next().is_none(),
            "nothing written to a directory others can write to"
        );
        assert!(
            Cache::try_open(&dir, euid())
                .unwrap_err()
                .contains("mode 777")
        );

        // Owned by someone other than this process's user.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let other = euid().wrapping_add(1);
        let (c, _) = compile_as(&engine, Some(&dir), &component("own"), other).unwrap();
        assert_eq!(imports(&engine, &c), ["own"]);
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none());
        assert!(
            Cache::try_open(&dir, other)
                .unwrap_err()
                .contains("owned by uid")
        );

        // Private and ours: used.
        assert!(Cache::try_open(&dir, euid()).is_ok());
    }

    #[test]
    fn a_key_file_others_can_read_or_a_link_is_refused() {
        let (_tmp, dir) = private_dir();
        let cache = Cache::try_open(&dir, euid()).unwrap();
        let key = dir.join(KEY_FILE);
        assert_eq!(
            Cache::try_open(&dir, euid()).unwrap().key,
            cache.key,
            "kept"
        );

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            Cache::try_open(&dir, euid())
                .unwrap_err()
                .contains("mode 644")
        );

        std::fs::remove_file(&key).unwrap();
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, [1u8; KEY_LEN]).unwrap();
        std::fs::set_permissions(&elsewhere, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &key).unwrap();
        assert!(
            Cache::try_open(&dir, euid()).is_err(),
            "a link is not followed"
        );

        std::fs::remove_file(&key).unwrap();
        std::fs::write(&key, b"short").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(
            Cache::try_open(&dir, euid())
                .unwrap_err()
                .contains("holds 5 bytes")
        );
    }
}
