//! Proves the namespace harness itself: servers in the edge namespace answer clients in the
//! client namespace over IPv4 and IPv6, from extra client addresses too, and cleanup removes
//! everything. Needs root.

use std::{path::Path, time::Duration};

use tests::netns::{HTTP_BODY, NETNS_DIR, Sandbox, ServerKind};

fn http_code(sb: &Sandbox, extra: &[&str], url: &str) -> (i32, String) {
    let mut args = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    sb.curl_from_client(&args).expect("curl runs")
}

#[test]
fn http_over_ipv4_and_ipv6() {
    let sb = Sandbox::new("sbx").expect("sandbox");
    let _srv = sb.spawn_http_server_edge(8080).expect("server");

    let v4 = format!("http://{}:8080/", sb.edge_v4());
    let v6 = format!("http://[{}]:8080/", sb.edge_v6());
    assert_eq!(http_code(&sb, &[], &v4), (0, "200".into()));
    assert_eq!(http_code(&sb, &[], &v6), (0, "200".into()));

    // The body, and keep-alive: the second request reuses the first connection.
    let (rc, out) = sb
        .curl_from_client([
            "-H",
            "X-MBX-APIKEY: abcdefgh",
            "-w",
            "|%{num_connects}\n",
            &v4,
            &v4,
        ])
        .unwrap();
    assert_eq!(rc, 0);
    assert_eq!(out, format!("{HTTP_BODY}|1\n{HTTP_BODY}|0\n"));

    // Extra client addresses, in the subnet and outside it.
    let a4 = sb.add_client_v4().unwrap();
    let a6 = sb.add_client_v6().unwrap();
    sb.add_client_addr("198.51.100.7".parse().unwrap()).unwrap();
    sb.add_client_addr("2001:db8::7".parse().unwrap()).unwrap();
    for (src, url) in [
        (a4.to_string(), &v4),
        (a6.to_string(), &v6),
        ("198.51.100.7".into(), &v4),
        ("2001:db8::7".into(), &v6),
    ] {
        let (rc, code) = http_code(&sb, &["--interface", &src], url);
        assert_eq!((rc, code.as_str()), (0, "200"), "from {src}");
    }
    assert!(!sb.xdp_attached().unwrap());
}

#[test]
fn https_and_raw_tcp() {
    let sb = Sandbox::new("sbxtls").expect("sandbox");
    let _tls = sb
        .spawn_server_edge(8443, ServerKind::Https)
        .expect("https server");
    let _tcp = sb
        .spawn_server_edge(9878, ServerKind::TcpAck)
        .expect("tcp server");

    let host = "k-37c541a1.api.example.com";
    let resolve = format!("{host}:8443:{}", sb.edge_v4());
    let url = format!("https://{host}:8443/");
    assert_eq!(
        http_code(&sb, &["-k", "--resolve", &resolve], &url),
        (0, "200".into())
    );
    let resolve6 = format!("{host}:8443:[{}]", sb.edge_v6());
    assert_eq!(
        http_code(&sb, &["-k", "--resolve", &resolve6], &url),
        (0, "200".into())
    );

    let script = format!(
        "import socket; s = socket.create_connection(('{}', 9878), timeout=3); \
         s.sendall(b'8=FIX.4.4\\x019=5\\x0135=A\\x01'); print(s.recv(100).decode().strip())",
        sb.edge_v6()
    );
    let out = sb.run_client("python3", ["-c", &script]).unwrap();
    assert_eq!(out.trim(), "ACK 19");
}

#[test]
fn cleanup_removes_everything() {
    let sb = Sandbox::new("sbxgone").expect("sandbox");
    // Taken out of its kill-on-drop guard: the sandbox's cleanup alone must end it.
    let mut srv = sb
        .spawn_http_server_edge(8080)
        .expect("server")
        .into_child();
    let names = sb.names().clone();
    let (pin, tmp) = (sb.pin_dir().to_path_buf(), sb.tmp_dir().to_path_buf());
    assert!(pin.is_dir() && sb.state_dir().is_dir());
    std::fs::write(pin.join("marker"), b"").ok(); // bpffs refuses plain files; fine either way
    drop(sb);

    assert!(!Path::new(NETNS_DIR).join(&names.edge_ns).exists());
    assert!(!Path::new(NETNS_DIR).join(&names.client_ns).exists());
    assert!(!pin.exists());
    assert!(!tmp.exists());
    // The server was killed with the namespace.
    let mut waited = Duration::ZERO;
    while srv.try_wait().unwrap().is_none() {
        assert!(
            waited < Duration::from_secs(3),
            "server still running after cleanup"
        );
        std::thread::sleep(Duration::from_millis(50));
        waited += Duration::from_millis(50);
    }
}
