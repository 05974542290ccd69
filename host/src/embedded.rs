//! The embedded default: a private PostgreSQL cluster the host creates,
//! starts and stops itself, under the state folder, with the machine's
//! PostgreSQL binaries (`initdb`, `pg_ctl`).
//!
//! PostgreSQL refuses to run as root, so a host running as root runs the
//! server as an unprivileged user (`postgres` if it exists, else
//! `nobody`) and gives it the cluster folder. A cluster left running by a
//! host that was killed is found (`postmaster.pid`) and reused.
//!
//! Only the operator gets in (docs/security.md). The server listens on
//! 127.0.0.1, where any local user can reach the port, so TCP logins need
//! the superuser's password (`scram-sha-256`): a random one, made when the
//! cluster is created and kept in `pipeline-host.password` (0600) in the
//! cluster folder, and carried in the URL the host prints, so that the
//! operator can paste it into `psql`. The Unix socket lives in the 0700
//! cluster folder and admits only the server's own OS user (`peer`).
//! TCP with a password was chosen over "socket only": tokio-postgres,
//! `psql`, the tests and `host bench` all take the same
//! `postgres://user:password@127.0.0.1:port/db` URL, whatever OS user runs
//! them, and a root host reaches a server that runs as another user.
//!
//! The password is set in single-user mode (`postgres --single`), before the
//! server ever listens, so no moment exists when TCP logins are trusted. A
//! cluster an older host made with `--auth=trust` (no marker in
//! `pg_hba.conf`), or one whose password file was deleted, gets a new
//! password and `pg_hba.conf` on start (the server is stopped for it if it
//! runs), with a log line.

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
    #[error("the embedded PostgreSQL's password file: {0}")]
    Password(#[from] crate::fsutil::NotPrivate),
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

/// The superuser's password, in the cluster folder, 0600.
pub const PASSWORD_FILE: &str = "pipeline-host.password";

/// First line of the `pg_hba.conf` the host writes: a cluster without it
/// still trusts every local login (made by an older host) and is upgraded.
const HBA_MARK: &str = "# Written by the pipeline host: password logins over TCP";

/// Who may log in how: TCP needs the password (any local user can reach
/// 127.0.0.1); the socket, in the 0700 cluster folder, only the server's
/// own OS user.
const HBA: &str = "local   all          all                  peer
host    all          all   127.0.0.1/32   scram-sha-256
host    all          all   ::1/128        scram-sha-256
local   replication  all                  peer
host    replication  all   127.0.0.1/32   scram-sha-256
host    replication  all   ::1/128        scram-sha-256
";

pub struct EmbeddedPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    run_as: Option<(u32, u32, String)>,
    /// The superuser's password (hex: nothing to escape in a URL).
    password: String,
    /// Whether this process started the server (and so stops it).
    started_here: bool,
}

impl EmbeddedPostgres {
    /// Initialises the cluster in `dir` if needed, and starts it (or finds
    /// it already running).
    pub fn start(dir: &Path, tuning: &Tuning) -> Result<EmbeddedPostgres, EmbeddedError> {
        let bin = find_binaries().ok_or(EmbeddedError::NoBinaries)?;
        crate::fsutil::create_private_dir(dir).map_err(|source| EmbeddedError::Folder {
            path: dir.to_owned(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| EmbeddedError::Folder {
            path: dir.to_owned(),
            source,
        })?;
        let run_as = if crate::fsutil::euid() == 0 {
            let user = unprivileged_user().ok_or(EmbeddedError::NoUser)?;
            if let Some(parent) = dir.parent() {
                let_server_group_traverse(parent, &user)?;
            }
            check_reachable(&dir, &user)?;
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
            password: String::new(),
            started_here: false,
        };
        if pg.initialised() && !pg.secured() {
            if pg.running_port().is_some() {
                // Single-user mode needs the server down.
                pg.started_here = true;
                pg.stop();
            }
            pg.secure()?;
            tracing::warn!(dir = %pg.dir.display(), "upgraded the embedded PostgreSQL cluster: TCP logins were trusted (made by an older host) or its password file was missing; the superuser now has a new random password (in {PASSWORD_FILE}, 0600) and pg_hba.conf requires it; use the URL printed below");
        }
        if pg.initialised() {
            pg.password = pg.read_password()?;
        }
        if let Some(port) = pg.running_port() {
            tracing::info!(port, dir = %pg.dir.display(), "reusing the embedded PostgreSQL already running");
            pg.port = port;
            return Ok(pg);
        }
        if !pg.initialised() && std::fs::read_dir(&pg.dir).is_ok_and(|mut d| d.next().is_some()) {
            // An older host ran initdb in place and was killed before it
            // finished. Nothing can have been stored in it yet, so it is
            // made afresh.
            tracing::warn!(dir = %pg.dir.display(), "the embedded PostgreSQL cluster was left half-initialised (the host was stopped during initdb); initialising it again");
            pg.clear()?;
        }
        if !pg.initialised() {
            pg.init_beside(tuning)?;
            pg.password = pg.read_password()?;
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

    /// URL of a database in this cluster, with the superuser's password:
    /// what tokio-postgres and `psql` need.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// The cluster folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether logins need the password: `pg_hba.conf` is the host's and
    /// the password file exists.
    fn secured(&self) -> bool {
        let hba = std::fs::read_to_string(self.dir.join("pg_hba.conf")).unwrap_or_default();
        hba.starts_with(HBA_MARK) && self.dir.join(PASSWORD_FILE).exists()
    }

    fn read_password(&self) -> Result<String, EmbeddedError> {
        let path = self.dir.join(PASSWORD_FILE);
        let wrap = |source| EmbeddedError::Folder {
            path: path.clone(),
            source,
        };
        let file = crate::fsutil::open_no_follow(&path).map_err(wrap)?;
        crate::fsutil::check_secret(&path, &file.metadata().map_err(wrap)?)?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut &file, &mut text).map_err(wrap)?;
        Ok(text.trim().to_owned())
    }

    /// Gives the superuser a new random password (file first, then the
    /// role, in single-user mode: the server is not listening) and writes
    /// `pg_hba.conf`, marker last-but-first so that an interrupted run is
    /// redone on the next start.
    fn secure(&self) -> Result<(), EmbeddedError> {
        let wrap = |path: &Path| {
            let path = path.to_owned();
            move |source| EmbeddedError::Folder { path, source }
        };
        let password = crate::fsutil::random_hex(24).map_err(wrap(&self.dir))?;
        let file = self.dir.join(PASSWORD_FILE);
        crate::fsutil::write_private(&file, format!("{password}\n").as_bytes())
            .map_err(wrap(&file))?;
        // `password_encryption` is set so that an older default (md5)
        // cannot store something scram-sha-256 logins would not accept.
        let statement = format!("ALTER ROLE postgres WITH PASSWORD '{password}'\n");
        self.run_with_input(
            "postgres",
            &[
                "--single".as_ref(),
                "-D".as_ref(),
                self.dir.as_os_str(),
                "-c".as_ref(),
                "password_encryption=scram-sha-256".as_ref(),
                "postgres".as_ref(),
            ],
            Some(statement.as_bytes()),
        )?;
        // Rewriting an existing file keeps its owner (the server user).
        let hba = self.dir.join("pg_hba.conf");
        std::fs::write(&hba, format!("{HBA_MARK}, see docs/security.md\n{HBA}"))
            .map_err(wrap(&hba))?;
        Ok(())
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

    /// Initialises the cluster in a sibling folder of this process's own
    /// and renames it into place once complete. initdb's bootstrap backends
    /// outlive a killed host for a moment and go on writing where they
    /// were started; in a folder of their own they cannot race the next
    /// host's initdb, and the cluster folder is only ever empty or whole.
    fn init_beside(&self, tuning: &Tuning) -> Result<(), EmbeddedError> {
        let (parent, name) = match (self.dir.parent(), self.dir.file_name()) {
            (Some(parent), Some(name)) => (parent, name.to_string_lossy().into_owned()),
            _ => return self.init(tuning),
        };
        let prefix = format!(".{name}.init-");
        // What earlier, killed starts left (best effort: a straggling
        // backend may still be writing into one; the next start retries).
        for entry in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let staging = parent.join(format!("{prefix}{}", std::process::id()));
        let wrap = |path: &Path| {
            let path = path.to_owned();
            move |source| EmbeddedError::Folder { path, source }
        };
        let _ = std::fs::remove_dir_all(&staging);
        crate::fsutil::create_private_dir(&staging).map_err(wrap(&staging))?;
        if let Some((uid, gid, _)) = &self.run_as {
            chown_tree(&staging, *uid, *gid)?;
        }
        let staged = EmbeddedPostgres {
            dir: staging.clone(),
            bin: self.bin.clone(),
            port: 0,
            run_as: self.run_as.clone(),
            password: String::new(),
            started_here: false,
        };
        staged.init(tuning)?;
        // rename(2) replaces the empty cluster folder in one step.
        std::fs::rename(&staging, &self.dir).map_err(wrap(&self.dir))
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
                // Trusted only until `secure` below sets the password:
                // the server is not started in between.
                "--auth=trust".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        )?;
        self.secure()?;
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
        self.run_with_input(tool, args, None)
    }

    /// Runs a server binary as the server user, `input` on its stdin.
    fn run_with_input(
        &self,
        tool: &str,
        args: &[&std::ffi::OsStr],
        input: Option<&[u8]>,
    ) -> Result<(), EmbeddedError> {
        let mut command = Command::new(self.bin.join(tool));
        command.args(args).current_dir(&self.dir);
        if let Some((uid, gid, _)) = &self.run_as {
            // std drops root's supplementary groups when it sets the uid.
            command.uid(*uid).gid(*gid).env("HOME", &self.dir);
        }
        if tool == "initdb" || input.is_some() {
            // initdb (and single-user mode) die with the host: an orphan
            // finishing on its own would race the next host's start over
            // the same folder.
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
        let failed = |e: std::io::Error| EmbeddedError::Command {
            command: shown.clone(),
            detail: e.to_string(),
        };
        let output = match input {
            None => command.output().map_err(failed)?,
            Some(input) => {
                use std::io::Write;
                let mut child = command
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .map_err(failed)?;
                if let Some(mut stdin) = child.stdin.take() {
                    stdin.write_all(input).map_err(failed)?;
                }
                child.wait_with_output().map_err(failed)?
            }
        };
        let stderr = String::from_utf8_lossy(&output.stderr);
        // Single-user mode reports a failed statement on stderr and exits 0.
        if input.is_some() && (stderr.contains("ERROR:") || stderr.contains("FATAL:")) {
            return Err(EmbeddedError::Command {
                command: shown,
                detail: stderr.trim().to_owned(),
            });
        }
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

/// The folder of the newest PostgreSQL server binaries on the machine.
pub fn find_binaries() -> Option<PathBuf> {
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
fn check_reachable(dir: &Path, user: &(u32, u32, String)) -> Result<(), EmbeddedError> {
    for ancestor in dir.ancestors().skip(1) {
        if let Ok(meta) = std::fs::metadata(ancestor) {
            if !searchable_by(&meta, user) {
                return Err(EmbeddedError::Unreachable {
                    user: user.2.clone(),
                    path: ancestor.to_owned(),
                });
            }
        }
    }
    Ok(())
}

fn searchable_by(meta: &std::fs::Metadata, (uid, gid, _): &(u32, u32, String)) -> bool {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mode = meta.permissions().mode();
    (meta.uid() == *uid && mode & 0o100 != 0)
        || (meta.gid() == *gid && mode & 0o010 != 0)
        || mode & 0o001 != 0
}

/// A root host's private state folder (0700, its own) would keep the
/// server user out of the cluster inside it: let the server's group
/// through (0710: enter, not list), and nobody else.
fn let_server_group_traverse(state: &Path, user: &(u32, u32, String)) -> Result<(), EmbeddedError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(meta) = std::fs::metadata(state) else {
        return Ok(());
    };
    let mode = meta.permissions().mode() & 0o777;
    if searchable_by(&meta, user) || meta.uid() != crate::fsutil::euid() || mode & 0o077 != 0 {
        return Ok(());
    }
    let wrap = |source| EmbeddedError::Folder {
        path: state.to_owned(),
        source,
    };
    std::os::unix::fs::chown(state, None, Some(user.1)).map_err(wrap)?;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o710)).map_err(wrap)?;
    tracing::info!(folder = %state.display(), user = %user.2, "the state folder lets the PostgreSQL server's group through (mode 0710), so that the server, which runs as {}, reaches its cluster", user.2);
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
        } else if entry.file_name() != PASSWORD_FILE {
            // The password file stays the host's: the server never reads it.
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
