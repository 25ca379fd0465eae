use super::*;
use serde_json::json;

fn mmds(version: Version, imds_compat: bool) -> Mmds {
    let store = Arc::new(Mutex::new(json!({
        "latest": {
            "meta-data": {
                "ami-id": "ami-87654321",
                "reservation-id": "r-79054aef",
                "count": 3,
                "network": {"interfaces": {}}
            }
        }
    })));
    Mmds::new(
        store,
        MmdsOptions {
            version,
            imds_compat,
            ..Default::default()
        },
    )
}

/// Status, headers (lower-cased names) and body of a response.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_response(bytes: &[u8]) -> Resp {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut r = httparse::Response::new(&mut headers);
    let n = match r.parse(bytes).unwrap() {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => panic!("partial response"),
    };
    let headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let body = String::from_utf8_lossy(&bytes[n..]).into_owned();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length matches the body");
    Resp {
        status: r.code.unwrap(),
        headers,
        body,
    }
}

fn call_at(m: &Mmds, req: &str, now: Instant) -> (Resp, bool) {
    match m.serve(req.as_bytes(), now) {
        Served::Response {
            response,
            consumed,
            close,
        } => {
            if close {
                assert!(consumed <= req.len());
            } else {
                assert_eq!(consumed, req.len(), "one whole request consumed");
            }
            (parse_response(&response), close)
        }
        Served::Incomplete => panic!("incomplete: {req:?}"),
    }
}

fn call(m: &Mmds, req: &str) -> Resp {
    call_at(m, req, Instant::now()).0
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}\r\n")
}

fn token_request(ttl: &str) -> String {
    format!("PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n")
}

#[test]
fn v1_get_json_and_imds_text() {
    let m = mmds(Version::V1, false);
    let r = call(
        &m,
        &get("/latest/meta-data/", "Accept: application/json\r\n"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["ami-id"], "ami-87654321");
    assert_eq!(v["count"], 3);

    let r = call(
        &m,
        &get("/latest/meta-data/ami-id", "Accept: application/json\r\n"),
    );
    assert_eq!(r.body, "\"ami-87654321\"");

    // IMDS text: keys one a line, objects marked with '/', strings as themselves.
    let r = call(&m, &get("/latest/meta-data", ""));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.body, "ami-id\ncount\nnetwork/\nreservation-id");
    let r = call(&m, &get("/latest", "Accept: text/plain\r\n"));
    assert_eq!(r.body, "meta-data/");
    let r = call(&m, &get("/latest/meta-data/ami-id", ""));
    assert_eq!(r.body, "ami-87654321");
    // The whole store, and an empty object.
    assert_eq!(call(&m, &get("/", "")).body, "latest/");
    assert_eq!(
        call(&m, &get("/latest/meta-data/network/interfaces", "")).body,
        ""
    );
    // Numbers have no IMDS form.
    assert_eq!(call(&m, &get("/latest/meta-data/count", "")).status, 501);
    // V1 ignores tokens, even invalid ones.
    let r = call(
        &m,
        &get("/latest/meta-data/ami-id", "X-metadata-token: bogus\r\n"),
    );
    assert_eq!((r.status, r.body.as_str()), (200, "ami-87654321"));
}

#[test]
fn imds_compat_answers_text_whatever_accept_says() {
    let m = mmds(Version::V1, true);
    let r = call(
        &m,
        &get("/latest/meta-data/ami-id", "Accept: application/json\r\n"),
    );
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.body, "ami-87654321");
}

#[test]
fn missing_paths_are_404_and_other_methods_405() {
    let m = mmds(Version::V1, false);
    assert_eq!(call(&m, &get("/latest/nothing", "")).status, 404);
    assert_eq!(
        call(&m, &get("/latest/meta-data/ami-id/deeper", "")).status,
        404
    );
    for method in ["POST", "DELETE", "PATCH", "HEAD", "OPTIONS"] {
        let r = call(&m, &format!("{method} /latest HTTP/1.1\r\n\r\n"));
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, PUT"));
    }
    // PUT anywhere but the token path.
    let r = call(
        &m,
        "PUT /latest/meta-data HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
    );
    assert_eq!(r.status, 404);
}

#[test]
fn v2_needs_a_token_from_put() {
    let m = mmds(Version::V2, false);
    let t0 = Instant::now();
    // No token, a made-up token: 401.
    assert_eq!(call_at(&m, &get("/latest", ""), t0).0.status, 401);
    let bogus = get("/latest", "X-metadata-token: 0123456789abcdef\r\n");
    assert_eq!(call_at(&m, &bogus, t0).0.status, 401);

    let (r, close) = call_at(&m, &token_request("60"), t0);
    assert_eq!(r.status, 200);
    assert!(!close);
    assert_eq!(r.header("x-metadata-token-ttl-seconds"), Some("60"));
    let token = r.body.clone();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));

    let with_token = get(
        "/latest/meta-data/ami-id",
        &format!("X-metadata-token: {token}\r\n"),
    );
    let r = call_at(&m, &with_token, t0 + Duration::from_secs(59)).0;
    assert_eq!((r.status, r.body.as_str()), (200, "ami-87654321"));
    // The EC2 spelling of the header works too.
    let ec2 = get(
        "/latest/meta-data/ami-id",
        &format!("X-aws-ec2-metadata-token: {token}\r\n"),
    );
    assert_eq!(call_at(&m, &ec2, t0 + Duration::from_secs(1)).0.status, 200);

    // Expired: 401, and the token is forgotten.
    let r = call_at(&m, &with_token, t0 + Duration::from_secs(60)).0;
    assert_eq!(r.status, 401);
    assert_eq!(m.live_tokens(), 0);

    // Two tokens are distinct.
    let a = call_at(&m, &token_request("10"), t0).0.body;
    let b = call_at(
        &m,
        "PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\r\n",
        t0,
    )
    .0
    .body;
    assert_ne!(a, b);
}

#[test]
fn bad_token_requests_are_400() {
    let m = mmds(Version::V2, false);
    for ttl in ["0", "21601", "-1", "ten", ""] {
        assert_eq!(call(&m, &token_request(ttl)).status, 400, "ttl {ttl:?}");
    }
    assert_eq!(
        call(&m, "PUT /latest/api/token HTTP/1.1\r\n\r\n").status,
        400,
        "no TTL header"
    );
    let forwarded = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n";
    assert_eq!(call(&m, forwarded).status, 400);
    assert_eq!(m.live_tokens(), 0);
}

#[test]
fn tokens_are_bounded() {
    let m = mmds(Version::V2, false);
    let t0 = Instant::now();
    let first = call_at(&m, &token_request("1"), t0).0.body;
    for _ in 0..MAX_TOKENS + 10 {
        assert_eq!(call_at(&m, &token_request("600"), t0).0.status, 200);
    }
    assert_eq!(m.live_tokens(), MAX_TOKENS);
    // The one closest to expiring went first.
    let r = call_at(&m, &get("/", &format!("X-metadata-token: {first}\r\n")), t0).0;
    assert_eq!(r.status, 401);
}

#[test]
fn malformed_oversize_and_partial_requests() {
    let m = mmds(Version::V1, false);
    // Partial requests wait for more.
    assert_eq!(
        m.serve(b"GET /latest HT", Instant::now()),
        Served::Incomplete
    );
    assert_eq!(
        m.serve(
            b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 4\r\n\r\nab",
            Instant::now()
        ),
        Served::Incomplete
    );
    // Garbage and unsupported framing close the connection.
    for bad in [
        "\x00\x01\x02 garbage\r\n\r\n",
        "GET\r\n\r\n",
        "GET /latest HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        "GET latest HTTP/1.1\r\n\r\n",
    ] {
        let (r, close) = call_at(&m, bad, Instant::now());
        assert_eq!(r.status, 400, "{bad:?}");
        assert!(close);
    }
    let (r, close) = call_at(
        &m,
        "GET /latest HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        Instant::now(),
    );
    assert_eq!((r.status, close), (501, true));
    // Oversize headers, and a body that could never fit.
    let huge = format!(
        "GET /latest HTTP/1.1\r\nX-Pad: {}",
        "a".repeat(MAX_REQUEST_LEN)
    );
    assert_eq!(call_at(&m, &huge, Instant::now()).0.status, 413);
    let big_body = "PUT /latest/api/token HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n";
    assert_eq!(call_at(&m, big_body, Instant::now()).0.status, 413);
    let overflow = format!(
        "PUT /latest/api/token HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        usize::MAX
    );
    assert_eq!(call_at(&m, &overflow, Instant::now()).0.status, 413);
}

#[test]
fn connection_close_and_http_1_0() {
    let m = mmds(Version::V1, false);
    let (r, close) = call_at(&m, &get("/latest", "Connection: close\r\n"), Instant::now());
    assert!(close);
    assert_eq!(r.header("connection"), Some("close"));
    let (_, close) = call_at(&m, "GET /latest HTTP/1.0\r\n\r\n", Instant::now());
    assert!(close);
    let (_, close) = call_at(
        &m,
        "GET /latest HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
        Instant::now(),
    );
    assert!(!close);
}

#[test]
fn pipelined_requests_are_served_one_at_a_time() {
    let m = mmds(Version::V1, false);
    let two = format!(
        "{}{}",
        get("/latest", ""),
        get("/latest/meta-data/ami-id", "")
    );
    let Served::Response { consumed, .. } = m.serve(two.as_bytes(), Instant::now()) else {
        panic!("no response");
    };
    let r = call(&m, &two[consumed..]);
    assert_eq!(r.body, "ami-87654321");
}

#[test]
fn the_guest_sees_later_writes_to_the_store() {
    let store = Arc::new(Mutex::new(json!({})));
    let m = Mmds::new(store.clone(), MmdsOptions::default());
    assert_eq!(call(&m, &get("/key", "")).status, 404);
    *store.lock().unwrap() = json!({"key": "value"});
    assert_eq!(call(&m, &get("/key", "")).body, "value");
}

#[test]
fn handles_compare_by_identity() {
    let a = mmds(Version::V1, false);
    let b = mmds(Version::V1, false);
    assert_eq!(a, a.clone());
    assert_ne!(a, b);
}
