//! Just enough of the PostgreSQL wire protocol to refuse a client the way a server would:
//! answer `SSLRequest`/`GSSENCRequest` with `N`, read the startup packet, send an
//! `ErrorResponse`. Clients that are routed are never parsed: their bytes pass untouched.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const SSL_REQUEST: u32 = 80877103;
pub const GSSENC_REQUEST: u32 = 80877104;
pub const CANCEL_REQUEST: u32 = 80877102;
/// Startup packets are small; PostgreSQL itself caps them at 10000 bytes.
const MAX_STARTUP_LEN: u32 = 10_000;

/// SQLSTATEs pgfront answers with.
pub mod sqlstate {
    /// cannot_connect_now: the same code PostgreSQL uses while starting up or in recovery.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// too_many_connections
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// admin_shutdown
    pub const ADMIN_SHUTDOWN: &str = "57P01";
}

/// The first packet a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// A StartupMessage with its protocol version.
    Startup {
        version: u32,
    },
    Cancel,
    /// The client closed or sent something that is not PostgreSQL.
    Invalid,
}

/// An `ErrorResponse` message with severity FATAL.
pub fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + message.len());
    for (tag, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        body.push(tag);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(b'E');
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads the client's startup, answering encryption requests with `N` (pgfront does not
/// terminate TLS; a client that requires it gets a clear refusal from libpq itself).
pub async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> std::io::Result<Startup> {
    for _ in 0..3 {
        let len = s.read_u32().await?;
        if !(8..=MAX_STARTUP_LEN).contains(&len) {
            return Ok(Startup::Invalid);
        }
        let code = s.read_u32().await?;
        let mut rest = vec![0u8; len as usize - 8];
        s.read_exact(&mut rest).await?;
        match code {
            SSL_REQUEST | GSSENC_REQUEST => s.write_all(b"N").await?,
            CANCEL_REQUEST => return Ok(Startup::Cancel),
            v if v >> 16 >= 2 => return Ok(Startup::Startup { version: v }),
            _ => return Ok(Startup::Invalid),
        }
    }
    Ok(Startup::Invalid)
}

/// Refuses a client as PostgreSQL would, within `limit`: the answer is best effort, a client
/// that does not speak in time is simply closed.
pub async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, code: &str, message: &str, limit: Duration) {
    let _ = tokio::time::timeout(limit, async {
        if let Ok(Startup::Startup { .. }) = read_startup(s).await {
            s.write_all(&error_response(code, message)).await?;
            s.flush().await?;
        }
        s.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn startup_packet() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&196608u32.to_be_bytes());
        body.extend_from_slice(b"user\0app\0database\0app\0\0");
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend(body);
        p
    }

    #[test]
    fn error_response_layout() {
        let e = error_response("57P03", "no primary");
        assert_eq!(e[0], b'E');
        let len = u32::from_be_bytes(e[1..5].try_into().unwrap()) as usize;
        assert_eq!(len + 1, e.len());
        assert_eq!(&e[5..], b"SFATAL\0VFATAL\0C57P03\0Mno primary\0\0");
    }

    #[tokio::test]
    async fn ssl_request_then_startup_gets_n_then_error() {
        let (mut client, mut server) = duplex(1024);
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        client.write_all(&ssl).await.unwrap();
        client.write_all(&startup_packet()).await.unwrap();
        refuse(&mut server, "57P03", "no primary available", Duration::from_secs(5)).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got[0], b'N');
        assert_eq!(&got[1..], &error_response("57P03", "no primary available")[..]);
    }

    #[tokio::test]
    async fn garbage_is_closed_without_answer() {
        let (mut client, mut server) = duplex(1024);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        refuse(&mut server, "57P03", "x", Duration::from_secs(5)).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn cancel_request_is_recognised() {
        let (mut client, mut server) = duplex(1024);
        let mut c = 16u32.to_be_bytes().to_vec();
        c.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        c.extend_from_slice(&[0; 8]);
        client.write_all(&c).await.unwrap();
        assert_eq!(read_startup(&mut server).await.unwrap(), Startup::Cancel);
    }
}
