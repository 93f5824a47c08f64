//! The judge's HTTP transport: one JSON POST through `ureq` (HTTP and HTTPS, rustls), with a
//! per-request timeout and an optional bearer token. Status codes are returned, not turned into
//! errors, so the caller decides what is worth a retry.

use std::time::Duration;

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

/// POST `body` as JSON; the status code and the reply body. Errors are messages (connection
/// refused, timed out, TLS failure, malformed reply).
pub fn post_json(
    url: &str,
    body: &[u8],
    timeout: Duration,
    api_key: Option<&str>,
) -> Result<(u16, Vec<u8>), String> {
    check_url(url)?;
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
    let mut reply = request.send(body).map_err(|e| match e {
        ureq::Error::Timeout(_) => format!("no reply within {} s", timeout.as_secs_f64()),
        ureq::Error::Io(_) | ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            format!("cannot connect to {url}: {e}")
        }
        other => format!("request to {url} failed: {other}"),
    })?;
    let status = reply.status().as_u16();
    let bytes = reply
        .body_mut()
        .with_config()
        .limit(MAX_REPLY_BYTES)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => format!(
                "the reply is larger than {} KiB, more than a judge's score needs",
                MAX_REPLY_BYTES >> 10
            ),
            other => format!("cannot read the reply: {other}"),
        })?;
    Ok((status, bytes))
}
