//! An [`ObjectTransport`] to a network object store — S3 and S3-compatible servers (`s3://`),
//! Google Cloud Storage (`gs://`), Azure Blob Storage (`az://`, `azure://`) and plain HTTP/WebDAV
//! (`http://`, `https://`) — through the `object_store` crate, with its credential chain
//! (the provider's usual environment variables, profiles and instance metadata) and its retries.
//!
//! Layout: one key per object, `<prefix>/objects/ab/cdef…`, holding the same bytes as the loose
//! object file (header + payload), so a bucket synced to a disk is a store `FsTransport` reads.
//!
//! The contract of [`ObjectTransport`] holds as follows:
//! * `put` hashes what it sends and sends it as one PUT (or, for large objects, one multipart
//!   upload completed only after every part arrived and the hash matched; a mismatch aborts the
//!   upload). A PUT or a completed multipart upload is atomic on S3, GCS and Azure, so a key
//!   exists only complete; an upload killed midway leaves an invisible, incomplete multipart
//!   upload that the next push does not need (a bucket lifecycle rule removes it).
//! * `get` streams the download into [`Store::receive_object`], which checks it before it
//!   becomes visible locally.
//! * `has` answers from one listing of `<prefix>/objects/` per command (kept up to date by
//!   this process's own uploads), so a push of many objects costs one LIST per 1000 keys, not
//!   one HEAD per object.
//!
//! Calls block: each transport owns a small tokio runtime (current-thread) made per command.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload, RetryConfig, WriteMultipart};

use super::transport::{ObjectTransport, RemoteObject};
use super::verify::ObjectVerifier;
use super::{ObjectId, RemoteErrorKind, Store, StoreError};

/// URL schemes this transport serves.
pub const SCHEMES: [&str; 6] = ["s3://", "gs://", "az://", "azure://", "http://", "https://"];

/// Default size of a multipart upload's parts; objects above 4 parts' worth go multipart.
const DEFAULT_PART: usize = 16 << 20;
/// S3's smallest part (except the last).
const MIN_PART: usize = 5 << 20;
/// Parts in flight at once per object.
const PARTS_IN_FLIGHT: usize = 4;

/// Whether `url` names a network object store this transport serves.
pub fn is_object_store_url(url: &str) -> bool {
    SCHEMES.iter().any(|s| url.starts_with(s))
}

/// A network object store as the other side of a transfer.
pub struct ObjectStoreTransport {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    rt: tokio::runtime::Runtime,
    /// Object id → size on the server, from one listing (None: not listed yet).
    listing: Mutex<Option<HashMap<ObjectId, u64>>>,
    part_size: usize,
}

impl std::fmt::Debug for ObjectStoreTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreTransport")
            .field("url", &self.url)
            .finish()
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The error chain of `e` as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// Sort an `object_store` error into what the user can do about it.
fn classify(e: &object_store::Error) -> (RemoteErrorKind, String) {
    use object_store::Error as E;
    let text = chain(e);
    let has = |words: &[&str]| words.iter().any(|w| text.contains(w));
    let kind = if has(&["NoSuchBucket", "ContainerNotFound", "bucket does not exist"]) {
        RemoteErrorKind::NoBucket
    } else if matches!(e, E::PermissionDenied { .. } | E::Unauthenticated { .. })
        || has(&[
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "ExpiredToken",
            "403 Forbidden",
            "401 Unauthorized",
            "AuthenticationFailed",
        ])
    {
        RemoteErrorKind::Credentials
    } else if has(&[
        "error sending request",
        "onnection refused",
        "onnection reset",
        "dns error",
        "timed out",
        "connect",
    ]) {
        RemoteErrorKind::Unreachable
    } else if matches!(
        e,
        E::UnknownConfigurationKey { .. } | E::NotSupported { .. } | E::NotImplemented
    ) {
        RemoteErrorKind::Config
    } else {
        RemoteErrorKind::Other
    };
    (kind, text)
}

impl ObjectStoreTransport {
    /// Open the store at `url` (`s3://bucket/prefix`, `gs://…`, `az://container/prefix`,
    /// `https://host/path`). Nothing is contacted yet. Settings come from the environment:
    /// the provider's variables (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, …), plus `COIN_OBJECT_RETRIES`, `COIN_OBJECT_RETRY_TIMEOUT` (seconds)
    /// and `COIN_OBJECT_PART_SIZE` (bytes; docs/remotes.md).
    pub fn open(url: &str) -> Result<ObjectStoreTransport, StoreError> {
        let config = |reason: String| StoreError::Remote {
            op: "open the object store".into(),
            url: url.to_string(),
            kind: RemoteErrorKind::Config,
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| config("not a URL".into()))?;
        let mut retry = RetryConfig::default();
        if let Some(n) = env_u64("COIN_OBJECT_RETRIES") {
            retry.max_retries = n as usize;
        }
        if let Some(s) = env_u64("COIN_OBJECT_RETRY_TIMEOUT") {
            retry.retry_timeout = Duration::from_secs(s);
        }
        // The bucket (or container) is the host part; the rest is the prefix.
        let (bucket, prefix) = match rest.split_once('/') {
            Some((b, p)) => (b, p.trim_matches('/')),
            None => (rest, ""),
        };
        let bucket_url = format!("{scheme}://{bucket}");
        let built: Result<Arc<dyn ObjectStore>, object_store::Error> = match scheme {
            "s3" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(&bucket_url)
                    .with_retry(retry);
                let endpoint = std::env::var("AWS_ENDPOINT_URL")
                    .or_else(|_| std::env::var("AWS_ENDPOINT"))
                    .unwrap_or_default();
                if is_loopback_http(&endpoint) {
                    b = b.with_allow_http(true);
                }
                b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
            }
            "gs" => object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(&bucket_url)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
            "az" | "azure" => object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(&bucket_url)
                .with_retry(retry)
                .build()
                .map(|s| Arc::new(s) as Arc<dyn ObjectStore>),
            "http" | "https" => {
                let mut b = object_store::http::HttpBuilder::new()
                    .with_url(url)
                    .with_retry(retry);
                if scheme == "http" {
                    b = b.with_client_options(
                        object_store::ClientOptions::new().with_allow_http(true),
                    );
                }
                b.build().map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
            }
            other => {
                return Err(config(format!(
                    "unknown scheme '{other}' (coin speaks s3://, gs://, az://, http(s)://)"
                )))
            }
        };
        let store = built.map_err(|e| config(chain(&e)))?;
        let prefix = if scheme.starts_with("http") {
            Key::default()
        } else {
            Key::from(prefix)
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::io("start the network runtime for", PathBuf::from(url), e))?;
        let part_size = env_u64("COIN_OBJECT_PART_SIZE")
            .map(|n| (n as usize).max(MIN_PART))
            .unwrap_or(DEFAULT_PART);
        Ok(ObjectStoreTransport {
            url: url.trim_end_matches('/').to_string(),
            store,
            prefix,
            rt,
            listing: Mutex::new(None),
            part_size,
        })
    }

    fn key(&self, id: &ObjectId) -> Key {
        let hex = id.to_hex();
        let mut parts: Vec<String> = self
            .prefix
            .parts()
            .map(|p| p.as_ref().to_string())
            .collect();
        parts.extend([
            "objects".to_string(),
            hex[..2].to_string(),
            hex[2..].to_string(),
        ]);
        Key::from_iter(parts)
    }

    fn key_url(&self, id: &ObjectId) -> String {
        let hex = id.to_hex();
        format!("{}/objects/{}/{}", self.url, &hex[..2], &hex[2..])
    }

    fn err(&self, op: impl Into<String>, url: String, e: &object_store::Error) -> StoreError {
        let (kind, reason) = classify(e);
        StoreError::Remote {
            op: op.into(),
            url,
            kind,
            reason,
        }
    }

    /// Every object under the prefix with its size (one listing, then cached).
    fn listed(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, Option<HashMap<ObjectId, u64>>>, StoreError> {
        let mut guard = self
            .listing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            let mut dir: Vec<String> = self
                .prefix
                .parts()
                .map(|p| p.as_ref().to_string())
                .collect();
            dir.push("objects".into());
            let dir = Key::from_iter(dir);
            let store = Arc::clone(&self.store);
            let found = self.rt.block_on(async move {
                let mut out = HashMap::new();
                let mut list = store.list(Some(&dir));
                while let Some(meta) = list.next().await {
                    let meta = meta?;
                    let parts: Vec<String> = meta
                        .location
                        .parts()
                        .map(|p| p.as_ref().to_string())
                        .collect();
                    if let [.., a, b] = parts.as_slice() {
                        if let Ok(id) = ObjectId::from_hex(&format!("{a}{b}")) {
                            out.insert(id, meta.size);
                        }
                    }
                }
                Ok::<_, object_store::Error>(out)
            });
            *guard =
                Some(found.map_err(|e| self.err("list the objects of", self.url.clone(), &e))?);
        }
        Ok(guard)
    }

    /// The server's size of object `id`, `None` when it does not have it.
    pub fn remote_len(&self, id: &ObjectId) -> Result<Option<u64>, StoreError> {
        Ok(self.listed()?.as_ref().and_then(|m| m.get(id).copied()))
    }

    fn remember(&self, id: &ObjectId, len: u64) {
        if let Some(m) = self
            .listing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_mut()
        {
            m.insert(*id, len);
        }
    }

    /// Upload `path` (object `id`) as one multipart upload, hashing as it goes; aborted (and
    /// so never visible) when the bytes are not object `id` or a part fails.
    fn put_multipart(
        &self,
        id: &ObjectId,
        path: &Path,
        mut file: io::Take<std::fs::File>,
    ) -> Result<u64, StoreError> {
        let key = self.key(id);
        let url = self.key_url(id);
        let store = Arc::clone(&self.store);
        let part = self.part_size;
        enum Fail {
            Store(object_store::Error),
            Local(StoreError),
        }
        let result: Result<u64, Fail> = self.rt.block_on(async move {
            let upload = store.put_multipart(&key).await.map_err(Fail::Store)?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
            let mut verifier = ObjectVerifier::new(*id);
            let mut buf = vec![0u8; part];
            let outcome: Result<(), Fail> = async {
                loop {
                    let n = file
                        .read(&mut buf)
                        .map_err(|e| Fail::Local(StoreError::io("read", path, e)))?;
                    if n == 0 {
                        break;
                    }
                    verifier.update(&buf[..n]).map_err(|reason| {
                        Fail::Local(StoreError::Corrupt {
                            id: *id,
                            path: path.to_path_buf(),
                            reason,
                        })
                    })?;
                    writer
                        .wait_for_capacity(PARTS_IN_FLIGHT)
                        .await
                        .map_err(Fail::Store)?;
                    writer.write(&buf[..n]);
                }
                Ok(())
            }
            .await;
            let checked = outcome.and_then(|()| {
                verifier.finish().map_err(|reason| {
                    Fail::Local(StoreError::Corrupt {
                        id: *id,
                        path: path.to_path_buf(),
                        reason,
                    })
                })
            });
            match checked {
                Ok(len) => {
                    writer.finish().await.map_err(Fail::Store)?;
                    Ok(len)
                }
                Err(f) => {
                    // Best effort: an upload left open is invisible and harmless anyway.
                    let _ = writer.abort().await;
                    Err(f)
                }
            }
        });
        match result {
            Ok(len) => Ok(len),
            Err(Fail::Local(e)) => Err(e),
            Err(Fail::Store(e)) => Err(self.err("upload (multipart)", url, &e)),
        }
    }
}

/// Whether `endpoint` is plain HTTP to this machine (a test or development server).
fn is_loopback_http(endpoint: &str) -> bool {
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    matches!(host, "127.0.0.1" | "localhost" | "[::1]") || host.starts_with("127.")
}

/// A blocking reader over a download stream; remembers a network error so it is not taken
/// for a short object.
struct Download<'a> {
    rt: &'a tokio::runtime::Runtime,
    stream: futures_util::stream::BoxStream<'static, object_store::Result<bytes::Bytes>>,
    buf: bytes::Bytes,
    error: Option<object_store::Error>,
    bytes: u64,
}

impl Read for Download<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.buf.is_empty() {
            match self.rt.block_on(self.stream.next()) {
                Some(Ok(b)) => self.buf = b,
                Some(Err(e)) => {
                    let msg = e.to_string();
                    self.error = Some(e);
                    return Err(io::Error::other(msg));
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        let _ = self.buf.split_to(n);
        self.bytes += n as u64;
        Ok(n)
    }
}

impl ObjectStoreTransport {
    fn download(&self, id: &ObjectId) -> Result<Option<Download<'_>>, StoreError> {
        let key = self.key(id);
        let store = Arc::clone(&self.store);
        match self.rt.block_on(async move { store.get(&key).await }) {
            Ok(r) => Ok(Some(Download {
                rt: &self.rt,
                stream: r.into_stream(),
                buf: bytes::Bytes::new(),
                error: None,
                bytes: 0,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("download", self.key_url(id), &e)),
        }
    }
}

impl ObjectTransport for ObjectStoreTransport {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn has(&self, id: &ObjectId) -> Result<bool, StoreError> {
        Ok(self.remote_len(id)?.is_some())
    }

    fn len_there(&self, id: &ObjectId) -> Result<Option<u64>, StoreError> {
        self.remote_len(id)
    }

    fn put(&self, local: &Store, id: &ObjectId) -> Result<u64, StoreError> {
        // A loose object file or an object inside a pack: the same bytes either way.
        let (file, len, path) = local.open_raw(id)?;
        let sent = if len > (self.part_size * PARTS_IN_FLIGHT) as u64 {
            self.put_multipart(id, &path, file)?
        } else {
            let mut bytes = Vec::with_capacity(len as usize);
            let mut file = file;
            file.read_to_end(&mut bytes)
                .map_err(|e| StoreError::io("read", &path, e))?;
            ObjectVerifier::check_reader(*id, &mut bytes.as_slice()).map_err(|reason| {
                StoreError::Corrupt {
                    id: *id,
                    path: path.clone(),
                    reason,
                }
            })?;
            let n = bytes.len() as u64;
            let key = self.key(id);
            let store = Arc::clone(&self.store);
            self.rt
                .block_on(async move { store.put(&key, PutPayload::from(bytes)).await })
                .map_err(|e| self.err("upload", self.key_url(id), &e))?;
            n
        };
        self.remember(id, sent);
        Ok(sent)
    }

    fn get(&self, local: &Store, id: &ObjectId) -> Result<u64, StoreError> {
        if local.contains(id) {
            return Ok(0);
        }
        let Some(mut dl) = self.download(id)? else {
            return Err(StoreError::ObjectMissing { id: *id });
        };
        let source = PathBuf::from(self.key_url(id));
        let result = local.receive_object(id, &mut dl, &source);
        if let Some(e) = dl.error.take() {
            return Err(self.err("download", self.key_url(id), &e));
        }
        result?;
        Ok(dl.bytes)
    }

    fn check(&self, local: &Store, id: &ObjectId, quick: bool) -> Result<RemoteObject, StoreError> {
        let Some(len) = self.remote_len(id)? else {
            return Ok(RemoteObject::Missing);
        };
        if quick {
            if let Ok((_, here, _)) = local.open_raw(id) {
                if here != len {
                    return Ok(RemoteObject::Corrupt(format!(
                        "it is {len} bytes on the server but {here} here"
                    )));
                }
            }
            return Ok(RemoteObject::Ok { bytes: len });
        }
        let Some(mut dl) = self.download(id)? else {
            return Ok(RemoteObject::Missing);
        };
        let verdict = ObjectVerifier::check_reader(*id, &mut dl);
        if let Some(e) = dl.error.take() {
            return Err(self.err("download", self.key_url(id), &e));
        }
        Ok(match verdict {
            Ok(bytes) => RemoteObject::Ok { bytes },
            Err(reason) => RemoteObject::Corrupt(reason),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_endpoints() {
        assert!(is_object_store_url("s3://b/p"));
        assert!(is_object_store_url("gs://b"));
        assert!(is_object_store_url("az://c/p"));
        assert!(!is_object_store_url("/srv/coin"));
        assert!(!is_object_store_url("file:///srv/coin"));
        assert!(is_loopback_http("http://127.0.0.1:9000"));
        assert!(is_loopback_http("http://localhost:9000/"));
        assert!(!is_loopback_http("https://127.0.0.1:9000"));
        assert!(!is_loopback_http("http://s3.example.com"));
        assert!(!is_loopback_http(""));
    }

    #[test]
    fn keys_follow_the_loose_layout() {
        // Opening contacts nothing.
        let t = ObjectStoreTransport::open("s3://bucket/team/study/").unwrap();
        let id = ObjectId::from(blake3::hash(b"x"));
        let hex = id.to_hex();
        assert_eq!(
            t.key(&id).as_ref(),
            format!("team/study/objects/{}/{}", &hex[..2], &hex[2..])
        );
        assert_eq!(
            t.key_url(&id),
            format!("s3://bucket/team/study/objects/{}/{}", &hex[..2], &hex[2..])
        );
        let bare = ObjectStoreTransport::open("s3://bucket").unwrap();
        assert!(bare.key(&id).as_ref().starts_with("objects/"));
        let err = ObjectStoreTransport::open("ftp://x/y").unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Remote {
                    kind: RemoteErrorKind::Config,
                    ..
                }
            ),
            "{err}"
        );
    }
}
