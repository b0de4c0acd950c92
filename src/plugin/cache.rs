//! Precompiled plugins on disk, keyed by the component's SHA-256 and the
//! engine's compatibility hash, so a restart does not compile again.

use std::hash::{Hash, Hasher};
use std::path::Path;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Compiles `bytes`, or loads the artifact a compatible engine made from the
/// same bytes. Returns the component and the bytes' hash.
pub(super) fn compile(
    engine: &Engine,
    dir: Option<&Path>,
    bytes: &[u8],
) -> anyhow::Result<(Component, String)> {
    let hash = hex::encode(Sha256::digest(bytes));
    let Some(dir) = dir else {
        return Ok((Component::from_binary(engine, bytes)?, hash));
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let file = dir.join(format!("{hash}-{:016x}.cwasm", h.finish()));
    if file.exists() {
        // SAFETY: the file was written by `precompile_component` of an engine
        // with the same compatibility hash, into a directory this process owns;
        // deserialize checks the header and refuses what does not match.
        match unsafe { Component::deserialize_file(engine, &file) } {
            Ok(component) => return Ok((component, hash)),
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "ignoring unusable cached plugin")
            }
        }
    }
    let compiled = engine.precompile_component(bytes)?;
    // SAFETY: these bytes were produced by `precompile_component` just now.
    let component = unsafe { Component::deserialize(engine, &compiled)? };
    if let Err(e) = write_atomically(dir, &file, &compiled) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot cache compiled plugin");
    }
    Ok((component, hash))
}

fn write_atomically(dir: &Path, file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{}.tmp", ulid::Ulid::new()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, file)
}
