//! The host's HTTP server out of file descriptors: `accept` then fails
//! with EMFILE at once, and keeps failing for as long as clients wait in
//! the backlog. The server must pause instead of spinning a core, and
//! answer again once descriptors are free.
//!
//! The server runs in this test's own process (the real `http::serve`),
//! so the descriptor limit starves it alone: lowered on a whole host, it
//! would starve the source and the database connection as well, which is
//! not what this test is about. This file holds one test, so the limit
//! touches nothing else.

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// CPU time (user + system) this process has used.
fn cpu_time() -> Duration {
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn set_fd_limit(soft: u64) {
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit.rlim_cur = soft;
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) },
        0,
        "setrlimit: {}",
        std::io::Error::last_os_error()
    );
}

fn healthz(addr: std::net::SocketAddr) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn out_of_file_descriptors_the_server_pauses_instead_of_spinning() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    // Thirty clients that connect and say nothing, queued in the backlog
    // before the server accepts anything.
    let clients: Vec<TcpStream> = (0..30).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // Room for two more descriptors: two clients are accepted, then every
    // accept fails with EMFILE.
    set_fd_limit(open_fds() + 2);
    let state = Arc::new(host::http::State {
        status: None,
        metrics: host::metrics::global(),
    });
    runtime.spawn(host::http::serve(listener, state));

    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time() - before;
    // A spinning accept loop burns a core for the whole 3 s; pausing
    // costs next to nothing.
    assert!(
        used < Duration::from_secs(1),
        "the server used {used:?} of CPU in 3 s while out of descriptors"
    );

    drop(clients);
    // Descriptors free again: the closed clients are accepted and let go,
    // and a new one is answered.
    let started = std::time::Instant::now();
    loop {
        if let Some(answer) = healthz(addr) {
            assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no answer after the descriptors were freed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    runtime.shutdown_background();
}
