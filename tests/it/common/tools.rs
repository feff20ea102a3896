//! The Python tools of the OpenAPI tests (openapi-spec-validator, Schemathesis), installed with
//! pinned versions by `scripts/install-test-deps.sh` into a virtualenv this module finds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Where `scripts/install-test-deps.sh` puts the virtualenv (same rule as the script).
fn venv_dir() -> PathBuf {
    if let Ok(v) = std::env::var("TOLLGATE_TEST_VENV") {
        return PathBuf::from(v);
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").expect("HOME is set")).join(".cache")
        });
    cache.join("tollgate-test-tools")
}

/// The virtualenv's `bin/` directory, installing the tools first when they are missing or
/// stale. Panics (never skips) when they cannot be installed.
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install-test-deps.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run scripts/install-test-deps.sh");
        assert!(
            out.status.success(),
            "scripts/install-test-deps.sh failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = venv_dir().join("bin");
        assert!(
            bin.join("schemathesis").exists(),
            "scripts/install-test-deps.sh ran but {} has no schemathesis",
            bin.display()
        );
        bin
    })
    .clone()
}

/// A file of the repository.
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}
