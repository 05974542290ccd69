//! A blocking GET for `host top`: one request per connection, as the
//! server answers, with timeouts so an unreachable host is reported
//! within seconds instead of hanging the terminal.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr}{path}: answered {status}")]
    Status {
        addr: String,
        path: String,
        status: String,
    },
    #[error("{addr}: not an HTTP response")]
    Malformed { addr: String },
}

/// Largest body accepted: a status document is a few tens of kB.
const MAX_BODY: u64 = 16 << 20;

/// `GET path` on `addr` (host:port); the body of a 200 answer.
pub fn get(addr: &str, path: &str, timeout: Duration) -> Result<String, ClientError> {
    let io = |source| ClientError::Io {
        addr: addr.to_owned(),
        source,
    };
    let target = addr
        .to_socket_addrs()
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| ClientError::Connect {
            addr: addr.to_owned(),
            source: std::io::Error::other("no address"),
        })?;
    let mut stream =
        TcpStream::connect_timeout(&target, timeout).map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(io)?;
    let mut bytes = Vec::new();
    stream.take(MAX_BODY).read_to_end(&mut bytes).map_err(io)?;
    let text = String::from_utf8_lossy(&bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Malformed {
            addr: addr.to_owned(),
        })?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(ClientError::Status {
            addr: addr.to_owned(),
            path: path.to_owned(),
            status: status
                .split_once(' ')
                .map_or(status, |(_, rest)| rest)
                .to_owned(),
        });
    }
    Ok(body.to_owned())
}
