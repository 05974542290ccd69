//! Only the operator gets in (docs/security.md): the embedded database
//! takes no login without its password, the URL the host prints carries
//! it (psql works with it), a trust cluster of an older host is upgraded;
//! compile cache entries the host did not write are compiled again, never
//! loaded; manifest paths stay in the plugins folder and stage names are
//! plain; `host bench` deletes only a work folder it made.
//!
//! The checks "as another OS user" run `nobody` through `runuser` and
//! need root; otherwise they print why they are skipped.

mod common;

use std::io::BufRead;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn psql() -> PathBuf {
    host::embedded::find_binaries()
        .map(|bin| bin.join("psql"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "psql".into())
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `psql -w URL -tAc SQL` as `user` (None: this process's user).
fn psql_as(user: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = match user {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(psql());
            c
        }
        None => Command::new(psql()),
    };
    // Never prompt for a password: a refusal must be a refusal.
    cmd.arg("-w")
        .args(args)
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "10")
        .current_dir("/")
        .stdin(Stdio::null())
        .output()
        .expect("run psql")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The port of a `postgres://user:password@127.0.0.1:PORT/db` URL.
fn port_of(url: &str) -> String {
    url.rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn another_os_user_cannot_log_in_to_the_embedded_server_and_the_printed_url_works_with_psql() {
    let dir = scratch("security-embedded");
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "1",
            "--events-per-file",
            "40",
            "--duplicate-rate",
            "0",
        ],
    );
    // The server user must reach the cluster: under the system temp folder.
    let state = std::env::temp_dir().join(format!("pipeline-security-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut child = host()
        .args(["run", "--plugins"])
        .arg(plugins_dir())
        .arg("--input")
        .arg(&input)
        .arg("--state-dir")
        .arg(&state)
        .args(["--metrics-addr", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let host = Running::new(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("the host prints the embedded server's URL");
    let url = line
        .strip_prefix("embedded PostgreSQL: ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("first line is not the URL: {line}"))
        .to_owned();

    // The operator pastes the printed URL into psql.
    let started = Instant::now();
    let rows = loop {
        let out = psql_as(
            None,
            &[&url, "-tAc", "SELECT count(*) FROM ecommerce_events"],
        );
        let n = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && n == "40" {
            break n;
        }
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "psql with the printed URL never saw the 40 rows: {}",
            text(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(rows, "40");

    // What a login needs is the operator's alone.
    let cluster = state.join("postgres");
    let password_file = cluster.join(host::embedded::PASSWORD_FILE);
    assert_eq!(mode(&password_file), 0o600);
    assert_eq!(mode(&cluster), 0o700);
    assert_eq!(
        mode(&state) & 0o007,
        0,
        "the state folder is open to every user"
    );
    let password = std::fs::read_to_string(&password_file).unwrap();
    assert!(
        url.contains(&format!(":{}@", password.trim())),
        "{url} does not carry the password"
    );

    // No password, a wrong one: no login over TCP, for anyone.
    let port = port_of(&url);
    let bare = format!("postgres://postgres@127.0.0.1:{port}/ecommerce");
    let wrong = format!("postgres://postgres:guess@127.0.0.1:{port}/ecommerce");
    for attempt in [&bare, &wrong] {
        let out = psql_as(None, &[attempt, "-tAc", "SELECT 1"]);
        assert!(!out.status.success(), "{attempt} logged in: {}", text(&out));
    }

    if !is_root() {
        println!("skipped the checks as another OS user: they run `nobody` through runuser, which needs root");
    } else {
        for attempt in [&bare, &wrong] {
            let out = psql_as(Some("nobody"), &[attempt, "-tAc", "SELECT 1"]);
            let said = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success() && said.contains("password"),
                "nobody, {attempt}: {}",
                text(&out)
            );
        }
        // Nor through the Unix socket, nor by reading the password.
        let socket = cluster.display().to_string();
        let out = psql_as(
            Some("nobody"),
            &[
                "-h",
                &socket,
                "-p",
                &port,
                "-U",
                "postgres",
                "ecommerce",
                "-tAc",
                "SELECT 1",
            ],
        );
        assert!(
            !out.status.success(),
            "nobody, by the socket: {}",
            text(&out)
        );
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--", "cat"])
            .arg(&password_file)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "nobody read the password: {}",
            text(&out)
        );
    }
    assert!(host.terminate(), "the host did not exit cleanly");
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn a_trust_cluster_of_an_older_host_is_upgraded_on_start() {
    let dir = scratch("security-upgrade");
    let input = dir.join("input");
    generate(
        &input,
        &[
            "--files",
            "1",
            "--events-per-file",
            "30",
            "--duplicate-rate",
            "0",
        ],
    );
    let state =
        std::env::temp_dir().join(format!("pipeline-security-upgrade-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let cluster = state.join("postgres");
    std::fs::create_dir_all(&cluster).unwrap();
    std::fs::set_permissions(&cluster, std::fs::Permissions::from_mode(0o700)).unwrap();
    let bin = host::embedded::find_binaries().expect("PostgreSQL server binaries");
    // As the older host made it: initdb --auth=trust, its settings appended,
    // running under the unprivileged user when we are root.
    let user = ["postgres", "nobody"]
        .into_iter()
        .find(|u| {
            Command::new("id")
                .arg(u)
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .unwrap();
    let as_server = |tool: &str| {
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--"]).arg(bin.join(tool));
            c
        } else {
            Command::new(bin.join(tool))
        };
        c.current_dir("/");
        c
    };
    if is_root() {
        let uid = Command::new("id").args(["-u", user]).output().unwrap();
        let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap();
        std::os::unix::fs::chown(&cluster, Some(uid), None).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = as_server("initdb")
        .arg("-D")
        .arg(&cluster)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {}", text(&out));
    let conf = cluster.join("postgresql.conf");
    let mut settings = std::fs::read_to_string(&conf).unwrap();
    settings.push_str("\n# Set by the pipeline host for ingest.\nlisten_addresses = '127.0.0.1'\nshared_buffers = 128MB\nmax_connections = 50\n");
    std::fs::write(&conf, settings).unwrap();
    // And it is running, as a killed older host left it.
    let old_port = free_port().to_string();
    let options = format!("-p {old_port} -h 127.0.0.1 -k {}", cluster.display());
    let out = as_server("pg_ctl")
        .arg("-D")
        .arg(&cluster)
        .arg("-l")
        .arg(cluster.join("server.log"))
        .args(["-w", "-o", &options, "start"])
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_ctl start: {}", text(&out));
    let trusted = format!("postgres://postgres@127.0.0.1:{old_port}/postgres");
    let out = psql_as(None, &[&trusted, "-tAc", "SELECT 1"]);
    assert!(
        out.status.success(),
        "the old cluster trusts: {}",
        text(&out)
    );

    let out = host()
        .args(["run", "--plugins"])
        .arg(plugins_dir())
        .arg("--input")
        .arg(&input)
        .arg("--state-dir")
        .arg(&state)
        .args(["--metrics-addr", "off", "--once"])
        .output()
        .unwrap();
    assert!(out.status.success(), "host run: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upgraded the embedded PostgreSQL cluster"),
        "no upgrade logged: {stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("30 written"),
        "{}",
        text(&out)
    );
    let hba = std::fs::read_to_string(cluster.join("pg_hba.conf")).unwrap();
    assert!(!hba.contains("trust"), "pg_hba.conf still trusts:\n{hba}");
    assert!(hba.contains("scram-sha-256"), "{hba}");
    assert_eq!(mode(&cluster.join(host::embedded::PASSWORD_FILE)), 0o600);

    // Started again: the password is needed, and the URL has it.
    let server = host::embedded::EmbeddedPostgres::start(&cluster, &Default::default()).unwrap();
    let url = server.url("ecommerce");
    let out = psql_as(
        None,
        &[&url, "-tAc", "SELECT count(*) FROM ecommerce_events"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "30",
        "{}",
        text(&out)
    );
    let bare = format!("postgres://postgres@127.0.0.1:{}/ecommerce", server.port());
    let out = psql_as(None, &[&bare, "-tAc", "SELECT 1"]);
    assert!(
        !out.status.success(),
        "logged in without the password: {}",
        text(&out)
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&state);
}

/// A sample the transform changes (spelling of the type), keeps and
/// rejects (unknown type), and `host plugin test` over it with `cache`.
fn sample(dir: &Path) -> PathBuf {
    let file = dir.join("sample.csv");
    let ids: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    std::fs::write(
        &file,
        format!(
            "event_id,user_id,event_type,product_id,price,event_time\n\
             {},1,AddToCart,5,9.99,2026-01-05T00:00:00Z\n\
             {},2,view,5,9.99,2026-01-05T00:00:00Z\n\
             {},3,teleport,5,9.99,2026-01-05T00:00:00Z\n",
            ids[0], ids[1], ids[2]
        ),
    )
    .unwrap();
    file
}

fn plugin_test_with(component: &Path, input: &Path, cache: &Path) -> Output {
    host()
        .args(["plugin", "test"])
        .arg(component)
        .arg("--input")
        .arg(input)
        .args(["--json", "--grant", "clock"])
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

/// The per-row outcomes of a `--json` run (the summary has timings).
fn outcomes(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "plugin test: {}", text(out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"outcome\""))
        .map(str::to_owned)
        .collect()
}

fn entries(cache: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    found.sort();
    found
}

#[test]
fn a_cache_entry_with_a_wrong_mac_is_compiled_again_not_loaded() {
    let dir = scratch("security-cache-mac");
    let cache = dir.join("cache");
    let input = sample(&dir);
    let transform = plugins_dir().join("transform.wasm");
    let dedup = plugins_dir().join("dedup.wasm");
    let first = outcomes(&plugin_test_with(&transform, &input, &cache));
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(
        first.iter().any(|l| l.contains("changed")) && first.iter().any(|l| l.contains("rejected"))
    );
    let [entry] = entries(&cache).try_into().unwrap();
    assert_eq!(mode(&cache), 0o700);
    assert_eq!(mode(&entry), 0o600);

    // Plant another component's entry (a MAC of the host's, but for
    // another name) under the transform's name, then one with a byte of
    // its MAC changed: each is compiled again, never loaded.
    let _ = outcomes(&plugin_test_with(&dedup, &input, &cache));
    let dedup_entry = entries(&cache).into_iter().find(|e| *e != entry).unwrap();
    let genuine = std::fs::read(&entry).unwrap();
    let mut flipped = genuine.clone();
    flipped[10] ^= 1;
    for planted in [std::fs::read(&dedup_entry).unwrap(), flipped] {
        std::fs::write(&entry, &planted).unwrap();
        let out = plugin_test_with(&transform, &input, &cache);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            stderr.contains("was not written by this host")
                && stderr.contains("compiling the component again"),
            "{stderr}"
        );
        assert_eq!(outcomes(&out), first, "the transform did not run as itself");
        assert_ne!(
            std::fs::read(&entry).unwrap(),
            planted,
            "the entry was not replaced"
        );
        // The replaced entry is loaded again without complaint.
        let out = plugin_test_with(&transform, &input, &cache);
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("refusing"),
            "{}",
            text(&out)
        );
        assert_eq!(outcomes(&out), first);
    }
}

#[test]
fn a_cache_entry_another_user_may_write_or_planted_is_compiled_again_not_loaded() {
    let dir = scratch("security-cache-owner");
    let cache = dir.join("cache");
    let input = sample(&dir);
    let transform = plugins_dir().join("transform.wasm");
    let first = outcomes(&plugin_test_with(&transform, &input, &cache));
    let [entry] = entries(&cache).try_into().unwrap();
    let genuine = std::fs::read(&entry).unwrap();

    let mut cases = vec!["writable by other users"];
    if is_root() {
        cases.push("is owned by uid 65534");
    } else {
        println!("skipped the entry owned by another user: making one needs root");
    }
    for why in cases {
        std::fs::write(&entry, &genuine).unwrap();
        if why.contains("owned") {
            std::os::unix::fs::chown(&entry, Some(65534), Some(65534)).unwrap();
        } else {
            std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
        let out = plugin_test_with(&transform, &input, &cache);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            stderr.contains("refusing to load a compile cache entry") && stderr.contains(why),
            "{why}: {stderr}"
        );
        assert_eq!(outcomes(&out), first);
        let meta = std::fs::metadata(&entry).unwrap();
        assert_eq!(
            meta.uid(),
            unsafe { libc::geteuid() },
            "{why}: not replaced"
        );
        assert_eq!(meta.mode() & 0o777, 0o600, "{why}: not replaced");
    }

    // A cache folder others may write is not used at all, and says how to fix it.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = plugin_test_with(&transform, &input, &cache);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains("writable by other users")
            && stderr.contains("chmod 700")
            && stderr.contains("compile cache is off"),
        "{stderr}"
    );
    assert_eq!(outcomes(&out), first);
}

#[test]
fn plugin_test_caches_in_the_users_cache_folder_not_the_working_folder() {
    let dir = scratch("security-cache-home");
    let home = dir.join("home");
    let work = dir.join("work");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let input = sample(&dir);
    let out = host()
        .args(["plugin", "test"])
        .arg(plugins_dir().join("transform.wasm"))
        .arg("--input")
        .arg(&input)
        .env("HOME", &home)
        .env_remove("XDG_CACHE_HOME")
        .current_dir(&work)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let cache = home.join(".cache/ecommerce-pipeline");
    assert_eq!(
        entries(&cache).len(),
        1,
        "nothing cached in {}",
        cache.display()
    );
    assert_eq!(mode(&cache), 0o700);
    assert!(
        std::fs::read_dir(&work).unwrap().next().is_none(),
        "the working folder was written to"
    );
}

/// `host plugins` over a manifest: its failure text.
fn manifest_refusal(name: &str, manifest: &str) -> String {
    let dir = scratch(name);
    let plugins = plugins_with(
        &dir,
        &[(&plugins_dir().join("transform.wasm"), "transform.wasm")],
        manifest,
    );
    std::fs::copy(plugins_dir().join("dedup.wasm"), dir.join("x.wasm")).unwrap();
    let out = host()
        .args(["plugins", "--cache-dir", "off", "--plugins"])
        .arg(&plugins)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{manifest} was accepted: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_component_path_out_of_the_plugins_folder_is_refused_with_its_reason() {
    let up = manifest_refusal(
        "security-path-up",
        "[[stage]]\nname = \"transform\"\ncomponent = \"../x.wasm\"\n",
    );
    assert!(
        up.contains("../x.wasm leads out of the plugins folder"),
        "{up}"
    );
    assert!(
        up.contains("allow-components-outside-plugins-folder"),
        "{up}"
    );
    let absolute = manifest_refusal(
        "security-path-absolute",
        "[[stage]]\nname = \"transform\"\ncomponent = \"/tmp/x.wasm\"\n",
    );
    assert!(
        absolute.contains("/tmp/x.wasm is an absolute path"),
        "{absolute}"
    );

    // `host run` refuses it too, before it reads any input.
    let dir = scratch("security-path-run");
    let plugins = plugins_with(
        &dir,
        &[],
        "[[stage]]\nname = \"transform\"\ncomponent = \"../x.wasm\"\n",
    );
    let input = dir.join("input");
    write_csv(&input, "a.csv", &[row(1, 1)]);
    let url = fresh_db("security_path");
    let out = host()
        .args(run_args(&plugins, &input, &url, &dir.join("state")))
        .arg("--once")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("leads out of the plugins folder"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_stage_name_with_a_quote_is_refused() {
    let said = manifest_refusal(
        "security-name",
        "[[stage]]\nname = 'trans\"form'\ncomponent = \"transform.wasm\"\n",
    );
    assert!(
        said.contains(
            "stage name \"trans\\\"form\" is not allowed: use 1 to 63 of a-z, 0-9, _ and -"
        ),
        "{said}"
    );
}

#[test]
fn bench_refuses_a_work_folder_it_did_not_make() {
    let dir = scratch("security-bench");
    let work = dir.join("mine");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("keep.txt"), "precious").unwrap();
    let out = host()
        .args(["bench", "--events", "100", "--latency-seconds", "0"])
        .args(["--database-url", &admin_url()])
        .arg("--work-dir")
        .arg(&work)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("was not made by host bench"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(work.join("keep.txt")).unwrap(),
        "precious"
    );
}
