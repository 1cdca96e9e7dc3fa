//! `GET /status` over real HTTP: the embedded page, its headers, no token
//! needed while `/api/*` still needs one, and only GET/HEAD allowed. (The page
//! rendered in a real browser is tests/people/run.sh.)

mod common;

use common::TestServer;

#[tokio::test]
async fn status_page_is_served_without_a_token_and_loads_nothing_from_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let token = "status-page-token-0123456789";
    let server = TestServer::start(&[("AGENTD_API_TOKEN", token)], dir.path()).await;
    let r = common::get(server.addr, "/status").await;
    assert_eq!(r.status, 200);
    let h = |name: &str| r.headers[name].to_str().unwrap().to_owned();
    assert_eq!(h("content-type"), "text/html; charset=utf-8");
    assert!(h("content-security-policy").starts_with("default-src 'none'"));
    assert_eq!(h("x-content-type-options"), "nosniff");
    let page = r.text();
    assert!(page.starts_with("<!doctype html>"), "{}", &page[..40]);
    assert!(page.contains("id=\"verdict\""));
    assert!(!page.contains("http://") && !page.contains("https://"));

    assert_eq!(
        common::get(server.addr, "/api/chat/history").await.status,
        401
    );
    let head = common::request(server.addr, "HEAD", "/status", &[], bytes::Bytes::new()).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let post = common::request(server.addr, "POST", "/status", &[], bytes::Bytes::new()).await;
    assert_eq!(post.status, 405);
    assert_eq!(post.json()["error"]["code"], "method_not_allowed");
    server.stop().await;
}
