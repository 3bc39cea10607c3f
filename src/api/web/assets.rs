//! The UI's static files, embedded in the binary: one script, one style
//! sheet, and the vendored hashing library the login falls back on where
//! the browser offers no WebCrypto. Served only by their exact names
//! (nothing is read from disk, so no path reaches a file), with a version
//! in the URL and long cache headers.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("static/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("static/app.css"),
    },
    Asset {
        name: "noble-hashes.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("static/noble-hashes.js"),
    },
];

/// Each asset's version: the start of its SHA-256.
static VERSIONS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| crate::wire::hex(&Sha256::digest(a.body.as_bytes())[..6]))
        .collect()
});

/// The URL of an asset, with its version (so a new binary's file is never
/// taken from a cache).
pub fn url(name: &str) -> String {
    let i = ASSETS
        .iter()
        .position(|a| a.name == name)
        .expect("a known asset");
    format!("/static/{name}?v={}", VERSIONS[i])
}

/// `GET /static/{file}`.
pub async fn serve(Path(file): Path<String>) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.name == file) else {
        return (StatusCode::NOT_FOUND, "no such file\n").into_response();
    };
    let mut r = (StatusCode::OK, a.body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}
