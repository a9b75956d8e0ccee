//! Refusing service binaries built without failpoints. `treaty demo`, `treaty scenario run` and
//! `treaty chaos` crash and stall the services through failpoints, which are a cargo feature
//! (`failpoints`) of `treaty-coordinator` and `treaty-participant`. A binary built with them says
//! so on its `--version` line (`treaty-participant 0.1.0 (failpoints)`); one built without does
//! not, and arming a failpoint on it would do nothing, so a scenario would pass or fail for the
//! wrong reason. This module asks both binaries before anything starts.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The service binaries the lab commands start, both of which must carry failpoints.
pub const SERVICE_BINARIES: [&str; 2] = ["treaty-coordinator", "treaty-participant"];

/// What a `--version` line carries when the binary was built with the `failpoints` feature.
pub const FAILPOINTS_MARK: &str = "(failpoints)";

/// How to get binaries that pass the check.
pub const HOW_TO_FIX: &str = "build the fault-injection binaries with `cargo build-fi` \
     (cargo build --workspace --bins --features treaty-coordinator/failpoints,treaty-participant/failpoints)";

#[derive(Debug, thiserror::Error)]
pub enum FaultBuildError {
    #[error("cannot find the {name} binary: {source}; {HOW_TO_FIX}")]
    NotFound {
        name: String,
        source: treaty_harness::HarnessError,
    },
    #[error("cannot run `{} --version` ({name}): {source}; {HOW_TO_FIX}", path.display())]
    NotRunnable {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{} --version` ({name}) failed: {status}; {HOW_TO_FIX}", path.display())]
    VersionFailed {
        name: String,
        path: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error(
        "{name} at {} was built without failpoints (its --version says {version:?}, without \
         \"{FAILPOINTS_MARK}\"), so faults could not be injected; {HOW_TO_FIX}",
        path.display()
    )]
    WithoutFailpoints {
        name: String,
        path: PathBuf,
        version: String,
    },
}

/// Checks both service binaries, found where the harness will start them from
/// (`treaty_harness::os::binary_path`: `$TREATY_BIN_DIR`, else beside this executable).
pub fn check_service_binaries() -> Result<(), FaultBuildError> {
    for name in SERVICE_BINARIES {
        let path = treaty_harness::binary_path(name).map_err(|source| FaultBuildError::NotFound {
            name: name.to_owned(),
            source,
        })?;
        check_binary(name, &path)?;
    }
    Ok(())
}

/// Runs `path --version` and returns its first line if it carries [`FAILPOINTS_MARK`]; `name`
/// is what the error calls the binary.
pub fn check_binary(name: &str, path: &Path) -> Result<String, FaultBuildError> {
    let output =
        Command::new(path)
            .arg("--version")
            .output()
            .map_err(|source| FaultBuildError::NotRunnable {
                name: name.to_owned(),
                path: path.to_path_buf(),
                source,
            })?;
    if !output.status.success() {
        return Err(FaultBuildError::VersionFailed {
            name: name.to_owned(),
            path: path.to_path_buf(),
            status: output.status,
        });
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version = stdout.lines().next().unwrap_or_default().trim().to_owned();
    if version.contains(FAILPOINTS_MARK) {
        Ok(version)
    } else {
        Err(FaultBuildError::WithoutFailpoints {
            name: name.to_owned(),
            path: path.to_path_buf(),
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// A stand-in for a service binary: a shell script that prints `version` for `--version`.
    fn stand_in(dir: &Path, file: &str, version: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, format!("#!/bin/sh\necho '{version}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Runs the check, retrying while another test's fork may still hold the script open for
    /// writing (ETXTBSY), which is a race of the test, not of the check.
    fn check(path: &Path) -> Result<String, FaultBuildError> {
        for _ in 0..50 {
            match check_binary("treaty-participant", path) {
                Err(FaultBuildError::NotRunnable { source, .. })
                    if source.kind() == std::io::ErrorKind::ExecutableFileBusy =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
        check_binary("treaty-participant", path)
    }

    #[test]
    fn a_binary_with_failpoints_passes_and_one_without_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let with = stand_in(dir.path(), "with", "treaty-participant 0.1.0 (failpoints)");
        let without = stand_in(dir.path(), "without", "treaty-participant 0.1.0");

        assert_eq!(check(&with).unwrap(), "treaty-participant 0.1.0 (failpoints)");

        let error = check(&without).unwrap_err();
        assert!(
            matches!(&error, FaultBuildError::WithoutFailpoints { version, .. } if version == "treaty-participant 0.1.0"),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(message.contains("treaty-participant"), "{message}");
        assert!(message.contains(&without.display().to_string()), "{message}");
        assert!(message.contains("built without failpoints"), "{message}");
        assert!(message.contains("`cargo build-fi`"), "{message}");
        assert!(
            message.contains(
                "cargo build --workspace --bins --features treaty-coordinator/failpoints,treaty-participant/failpoints"
            ),
            "{message}"
        );
    }

    #[test]
    fn a_missing_or_failing_binary_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent");
        let error = check(&missing).unwrap_err();
        assert!(matches!(error, FaultBuildError::NotRunnable { .. }), "{error:?}");
        assert!(error.to_string().contains("cargo build-fi"), "{error}");

        let failing = dir.path().join("failing");
        std::fs::write(
            &failing,
            "#!/bin/sh\necho 'treaty-participant 0.1.0 (failpoints)'\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = check(&failing).unwrap_err();
        assert!(
            matches!(error, FaultBuildError::VersionFailed { .. }),
            "{error:?}"
        );
    }
}
