//! The embedded default: a private PostgreSQL cluster the host creates,
//! starts and stops itself, under the state folder, with the machine's
//! PostgreSQL binaries (`initdb`, `pg_ctl`).
//!
//! PostgreSQL refuses to run as root, so a host running as root runs the
//! server as an unprivileged user (`postgres` if it exists, else
//! `nobody`) and gives it the cluster folder. A cluster left running by a
//! host that was killed is found (`postmaster.pid`) and reused.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("no PostgreSQL server binaries found (looked for initdb and pg_ctl on PATH and in /usr/lib/postgresql/*/bin). Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`) or pass --database-url / set DATABASE_URL")]
    NoBinaries,
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("cluster folder {path}: {source}")]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("running as root, but no unprivileged user (postgres or nobody) exists to run PostgreSQL as; pass --database-url instead")]
    NoUser,
    #[error("the PostgreSQL server runs as {user}, which cannot reach {path}: move the state folder (--state-dir) somewhere it can, or pass --database-url")]
    Unreachable { user: String, path: PathBuf },
}

/// Settings for ingest: with the defaults, COPY throughput halves once
/// the table holds a few million rows.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub shared_buffers: String,
    pub max_wal_size: String,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            shared_buffers: "1GB".into(),
            max_wal_size: "8GB".into(),
        }
    }
}

/// The line `init` writes last: a cluster without it is unfinished.
const SETTINGS_MARK: &str = "# Set by the pipeline host for ingest.";

pub struct EmbeddedPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32, String)>,
    /// Whether this process started the server (and so stops it).
    started_here: bool,
}

impl EmbeddedPostgres {
    /// Initialises the cluster in `dir` if needed, and starts it (or finds
    /// it already running).
    pub fn start(dir: &Path, tuning: &Tuning) -> Result<EmbeddedPostgres, EmbeddedError> {
        let bin = find_binaries().ok_or(EmbeddedError::NoBinaries)?;
        std::fs::create_dir_all(dir).map_err(|source| EmbeddedError::Folder {
            path: dir.to_owned(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| EmbeddedError::Folder {
            path: dir.to_owned(),
            source,
        })?;
        let run_as = if unsafe { libc::geteuid() } == 0 {
            let user = unprivileged_user().ok_or(EmbeddedError::NoUser)?;
            check_reachable(&dir, &user.2)?;
            if owner(&dir) != Some(user.0) {
                chown_tree(&dir, user.0, user.1)?;
            }
            Some(user)
        } else {
            None
        };
        let mut pg = EmbeddedPostgres {
            dir,
            bin,
            port: 0,
            run_as,
            started_here: false,
        };
        if let Some(port) = pg.running_port() {
            tracing::info!(port, dir = %pg.dir.display(), "reusing the embedded PostgreSQL already running");
            pg.port = port;
            return Ok(pg);
        }
        if !pg.initialised() && std::fs::read_dir(&pg.dir).is_ok_and(|mut d| d.next().is_some()) {
            // initdb ran but the host never finished setting the cluster
            // up: it was killed meanwhile (initdb dies with it). Nothing
            // can have been stored in it yet, so it is made afresh.
            tracing::warn!(dir = %pg.dir.display(), "the embedded PostgreSQL cluster was left half-initialised (the host was stopped during initdb); initialising it again");
            pg.clear()?;
        }
        if !pg.initialised() {
            pg.init(tuning)?;
        }
        pg.port = free_port()?;
        // A server killed a moment ago (stale postmaster.pid) may still have
        // backends holding its shared memory, or a pg_ctl of a host killed
        // during start-up may be starting it: retry for a while, and reuse
        // the server if it comes up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match pg.launch() {
                Ok(()) => return Ok(pg),
                Err(e) if std::time::Instant::now() < deadline => {
                    if let Some(port) = pg.running_port() {
                        tracing::info!(
                            port,
                            "reusing the embedded PostgreSQL another start brought up"
                        );
                        pg.port = port;
                        return Ok(pg);
                    }
                    tracing::warn!("{e}; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(500));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether `init` completed: it ends by appending the host's settings.
    fn initialised(&self) -> bool {
        std::fs::read_to_string(self.dir.join("postgresql.conf"))
            .map(|text| text.contains(SETTINGS_MARK))
            .unwrap_or(false)
    }

    /// Empties the cluster folder (keeping the folder and its owner).
    fn clear(&self) -> Result<(), EmbeddedError> {
        let wrap = |source| EmbeddedError::Folder {
            path: self.dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&self.dir).map_err(wrap)?.flatten() {
            let path = entry.path();
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                std::fs::remove_dir_all(&path).map_err(wrap)?;
            } else {
                std::fs::remove_file(&path).map_err(wrap)?;
            }
        }
        Ok(())
    }

    /// Starts the server again after `stop`, on the port it had, so URLs
    /// handed out stay valid (outage tests stop and start it).
    pub fn start_again(&mut self) -> Result<(), EmbeddedError> {
        if self.started_here {
            return Ok(());
        }
        self.launch()
    }

    /// `pg_ctl start` on `self.port`, waiting until it accepts connections.
    fn launch(&mut self) -> Result<(), EmbeddedError> {
        let log = self.dir.join("server.log");
        let options = format!("-p {} -h 127.0.0.1 -k {}", self.port, self.dir.display());
        self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                self.dir.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                "120".as_ref(),
                "-o".as_ref(),
                options.as_ref(),
                "start".as_ref(),
            ],
        )
        .map_err(|e| match e {
            EmbeddedError::Command { command, detail } => EmbeddedError::Command {
                command,
                detail: format!("{detail}; server log: {}", tail(&log)),
            },
            other => other,
        })?;
        self.started_here = true;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// URL of a database in this cluster.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server if this process started it.
    pub fn stop(&mut self) {
        if !self.started_here {
            return;
        }
        self.started_here = false;
        let dir = self.dir.clone();
        if let Err(e) = self.run(
            "pg_ctl",
            &[
                "-D".as_ref(),
                dir.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "stop".as_ref(),
            ],
        ) {
            tracing::warn!("cannot stop the embedded PostgreSQL: {e}");
        }
    }

    fn init(&self, tuning: &Tuning) -> Result<(), EmbeddedError> {
        tracing::info!(dir = %self.dir.display(), "initialising the embedded PostgreSQL cluster");
        self.run(
            "initdb",
            &[
                "-D".as_ref(),
                self.dir.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        )?;
        let settings = format!(
            "\n{SETTINGS_MARK}\nlisten_addresses = '127.0.0.1'\nshared_buffers = {}\nmax_wal_size = {}\ncheckpoint_timeout = 15min\nwal_compression = on\nmax_connections = 50\n",
            tuning.shared_buffers, tuning.max_wal_size
        );
        let conf = self.dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|source| EmbeddedError::Folder {
            path: conf.clone(),
            source,
        })?;
        text.push_str(&settings);
        // Rewriting an existing file keeps its owner (the server user).
        std::fs::write(&conf, text).map_err(|source| EmbeddedError::Folder {
            path: conf.clone(),
            source,
        })?;
        Ok(())
    }

    /// The port of a server already running on this cluster, if any.
    fn running_port(&self) -> Option<u16> {
        let pid_file = std::fs::read_to_string(self.dir.join("postmaster.pid")).ok()?;
        let mut lines = pid_file.lines();
        let pid: i32 = lines.next()?.trim().parse().ok()?;
        let port: u16 = lines.nth(2)?.trim().parse().ok()?;
        // Signal 0 checks the process exists without touching it.
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        alive.then_some(port)
    }

    fn run(&self, tool: &str, args: &[&std::ffi::OsStr]) -> Result<(), EmbeddedError> {
        let mut command = Command::new(self.bin.join(tool));
        command.args(args).current_dir(&self.dir);
        if let Some((uid, gid, _)) = &self.run_as {
            // std drops root's supplementary groups when it sets the uid.
            command.uid(*uid).gid(*gid).env("HOME", &self.dir);
        }
        if tool == "initdb" {
            // initdb dies with the host: an orphan finishing on its own
            // would race the next host's start over the same folder.
            let parent = std::process::id();
            // SAFETY: prctl and getppid are async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    if libc::getppid() as u32 != parent {
                        return Err(std::io::Error::other("the host is gone"));
                    }
                    Ok(())
                });
            }
        }
        let shown = format!(
            "{tool} {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let output = command.output().map_err(|e| EmbeddedError::Command {
            command: shown.clone(),
            detail: e.to_string(),
        })?;
        if !output.status.success() {
            return Err(EmbeddedError::Command {
                command: shown,
                detail: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(())
    }
}

impl Drop for EmbeddedPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Creates `name` in the cluster at `admin_url` (a URL to the `postgres`
/// database) unless it exists.
pub async fn ensure_database(admin_url: &str, name: &str) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(admin_url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let quoted = name.replace('"', "\"\"");
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await
        {
            // Someone else created it in the meantime: fine.
            if e.code() != Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) {
                return Err(e);
            }
        }
    }
    Ok(())
}

fn find_binaries() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("pg_ctl").exists() && dir.join("initdb").exists())
    })
}

fn unprivileged_user() -> Option<(u32, u32, String)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    for wanted in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            if fields.len() >= 4 && fields[0] == wanted {
                if let (Ok(uid), Ok(gid)) = (fields[2].parse(), fields[3].parse()) {
                    return Some((uid, gid, wanted.to_owned()));
                }
            }
        }
    }
    None
}

/// Every folder above the cluster must be searchable by the server user.
fn check_reachable(dir: &Path, user: &str) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::PermissionsExt;
    for ancestor in dir.ancestors().skip(1) {
        if let Ok(meta) = std::fs::metadata(ancestor) {
            if meta.permissions().mode() & 0o001 == 0 {
                return Err(EmbeddedError::Unreachable {
                    user: user.to_owned(),
                    path: ancestor.to_owned(),
                });
            }
        }
    }
    Ok(())
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), EmbeddedError> {
    let wrap = |source| EmbeddedError::Folder {
        path: dir.to_owned(),
        source,
    };
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(wrap)?;
    for entry in std::fs::read_dir(dir).map_err(wrap)?.flatten() {
        let path = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            chown_tree(&path, uid, gid)?;
        } else {
            let _ = std::os::unix::fs::lchown(&path, Some(uid), Some(gid));
        }
    }
    Ok(())
}

fn owner(path: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.uid())
}

fn free_port() -> Result<u16, EmbeddedError> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| EmbeddedError::Command {
            command: "bind 127.0.0.1:0".into(),
            detail: e.to_string(),
        })?;
    Ok(listener.local_addr().map(|a| a.port()).unwrap_or(0))
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}
