//! The judge's HTTP transport: one JSON POST through `ureq` (HTTP and HTTPS, rustls), with a
//! per-request timeout and an optional bearer token. Status codes are returned, not turned into
//! errors, so the caller decides what is worth a retry.

use std::time::Duration;

use crate::tasks::formats::Escaped;

/// The largest reply body read from the judge: 1 MiB (a reply of 20 tokens is a few hundred
/// bytes; a larger body is refused while it is read).
pub const MAX_REPLY_BYTES: u64 = 1 << 20;

/// Check that `url` is an `http://` or `https://` URL with a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("the endpoint must start with http:// or https://, not '{url}'"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("no host in '{url}'"));
    }
    Ok(())
}

/// Why one request to the judge gave no usable reply. The transport's own error, where there is
/// one, is the source; text that came from the server is escaped.
#[derive(Debug, thiserror::Error)]
pub enum JudgeFailure {
    /// The endpoint is not an `http://` or `https://` URL with a host.
    #[error("{0}")]
    BadUrl(String),
    /// No reply within the timeout.
    #[error("no reply within {secs} s")]
    Timeout {
        /// The timeout in seconds.
        secs: f64,
    },
    /// No connection could be made.
    #[error("could not connect to {url}")]
    Connect {
        /// The URL requested.
        url: String,
        /// The transport's error.
        #[source]
        source: ureq::Error,
    },
    /// The request failed after connecting.
    #[error("the request to {url} failed")]
    Request {
        /// The URL requested.
        url: String,
        /// The transport's error.
        #[source]
        source: ureq::Error,
    },
    /// The reply body is over [`MAX_REPLY_BYTES`].
    #[error(
        "the reply is larger than {} KiB, more than a judge's score needs",
        MAX_REPLY_BYTES >> 10
    )]
    TooLarge,
    /// The reply body could not be read.
    #[error("could not read the reply")]
    ReadReply(#[source] ureq::Error),
    /// A status other than 200.
    #[error("HTTP {status}: {}", Escaped(body))]
    Status {
        /// The status code.
        status: u16,
        /// The start of the reply body.
        body: String,
    },
    /// A 200 reply that is not a chat completion with a message.
    #[error("{}", Escaped(.0))]
    BadReply(String),
}

/// POST `body` as JSON; the status code and the reply body. A status is returned, not turned
/// into an error; connection, timeout, TLS and read failures are [`JudgeFailure`]s.
pub fn post_json(
    url: &str,
    body: &[u8],
    timeout: Duration,
    api_key: Option<&str>,
) -> Result<(u16, Vec<u8>), JudgeFailure> {
    check_url(url).map_err(JudgeFailure::BadUrl)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut request = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("Accept", "application/json");
    if let Some(key) = api_key {
        request = request.header("Authorization", format!("Bearer {key}"));
    }
    let url = url.to_string();
    let mut reply = request.send(body).map_err(|e| match e {
        ureq::Error::Timeout(_) => JudgeFailure::Timeout {
            secs: timeout.as_secs_f64(),
        },
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            JudgeFailure::Connect { url, source: e }
        }
        other => JudgeFailure::Request { url, source: other },
    })?;
    let status = reply.status().as_u16();
    let bytes = reply
        .body_mut()
        .with_config()
        .limit(MAX_REPLY_BYTES)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => JudgeFailure::TooLarge,
            other => JudgeFailure::ReadReply(other),
        })?;
    Ok((status, bytes))
}
