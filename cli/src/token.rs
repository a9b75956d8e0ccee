//! `treaty token new`: a bearer token for a client that cannot present a certificate. The token
//! goes to a file only its owner can read (never to the terminal or the shell's history); the
//! access file gets only its SHA-256, printed here as the `[[caller]]` entry to paste.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::exit::{Exit, Failure};

#[derive(clap::Args)]
pub struct NewArgs {
    /// The caller's name: recorded as `token:<name>` (on heuristic decisions, in logs).
    pub name: String,
    /// Its roles, comma-separated: client, operator, admin, coordinator, participant, peer.
    #[arg(long, value_delimiter = ',', default_value = "client")]
    pub roles: Vec<String>,
    /// The PostgreSQL role its statements run under on every shard.
    #[arg(long)]
    pub database_role: Option<String>,
    /// Where to write the token (created readable by you only; refused if it exists).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn new(args: NewArgs) -> Result<()> {
    let usage = |message: String| anyhow::Error::new(Failure::new(Exit::Usage, message));
    if args.name.trim().is_empty() || args.name.contains(['"', '\\', '\n']) {
        return Err(usage(format!(
            "the name {:?} is empty or has a quote, backslash or newline",
            args.name
        )));
    }
    let token =
        treaty_proto::auth::new_token().map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    let hash = treaty_proto::auth::token_sha256_hex(&token);
    let roles: Vec<String> = args.roles.iter().map(|r| format!("{:?}", r.trim())).collect();
    let mut entry = format!(
        "[[caller]]\nname = {:?}\ntoken_sha256 = \"{hash}\"\nroles = [{}]\n",
        args.name,
        roles.join(", ")
    );
    if let Some(role) = &args.database_role {
        entry.push_str(&format!("database_role = {role:?}\n"));
    }
    // The entry must be one the services accept: check it before writing anything.
    treaty_proto::auth::AccessPolicy::parse(std::path::Path::new("(the entry below)"), &entry)
        .map_err(|error| usage(error.to_string()))?;
    if args.out.exists() {
        bail!(Failure::new(
            Exit::Usage,
            format!("{} exists; give a new file for the token", args.out.display())
        ));
    }
    treaty_proto::tls::dev_certs::write(&args.out, &format!("{token}\n"), true)
        .with_context(|| format!("writing the token to {}", args.out.display()))?;
    println!(
        "# Token written to {} (readable by you only).",
        args.out.display()
    );
    println!("# Add this to the coordinator's access file (--access-file); it holds only the token's hash:");
    print!("{entry}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &std::path::Path, roles: &[&str]) -> NewArgs {
        NewArgs {
            name: "batch".into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            database_role: Some("app_batch".into()),
            out: dir.join("batch.token"),
        }
    }

    #[test]
    fn a_new_token_is_private_and_refused_over_an_existing_file_or_with_an_unknown_role() {
        let dir = tempfile::tempdir().unwrap();
        new(args(dir.path(), &["client"])).unwrap();
        let path = dir.path().join("batch.token");
        let token = std::fs::read_to_string(&path).unwrap();
        assert!(token.trim().starts_with("trt_"), "{token}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let again = new(args(dir.path(), &["client"])).unwrap_err().to_string();
        assert!(again.contains("exists"), "{again}");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            token,
            "the first token is kept"
        );

        let other = tempfile::tempdir().unwrap();
        let unknown = new(args(other.path(), &["root"])).unwrap_err().to_string();
        assert!(unknown.contains("unknown role \"root\""), "{unknown}");
        assert!(!other.path().join("batch.token").exists(), "nothing written");
    }
}
