//! Key-bearing first payloads for the locators beyond the HTTP header: a TLS ClientHello with
//! the key in its SNI, a FIX.4.4 Logon with the key in tag 553, and a PROXY v2 header in front
//! of an HTTP request. Shaped like what real clients send, so the parse cost is realistic.

/// A TLS 1.3 ClientHello record as a current browser sends it: GREASE values, the SNI among
/// other extensions rather than first, an X25519 key share, and padding to 512 bytes.
pub fn tls_client_hello(sni: &str) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, typ: u16, body: &[u8]) {
        out.extend_from_slice(&typ.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    fn vec16(items: &[u16]) -> Vec<u8> {
        let mut v = ((items.len() * 2) as u16).to_be_bytes().to_vec();
        for i in items {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }
    let mut exts = Vec::new();
    ext(&mut exts, 0x0a0a, &[]); // GREASE
    ext(&mut exts, 0x0017, &[]); // extended_master_secret
    ext(&mut exts, 0xff01, &[0]); // renegotiation_info
    ext(&mut exts, 0x000a, &vec16(&[0x2a2a, 0x001d, 0x0017, 0x0018])); // supported_groups
    ext(&mut exts, 0x000b, &[1, 0]); // ec_point_formats
    ext(&mut exts, 0x0023, &[]); // session_ticket
    {
        // server_name: list length, type host_name, name length, name
        let name = sni.as_bytes();
        let mut b = ((name.len() + 3) as u16).to_be_bytes().to_vec();
        b.push(0);
        b.extend_from_slice(&(name.len() as u16).to_be_bytes());
        b.extend_from_slice(name);
        ext(&mut exts, 0x0000, &b);
    }
    {
        let mut alpn = Vec::new();
        for p in [&b"h2"[..], b"http/1.1"] {
            alpn.push(p.len() as u8);
            alpn.extend_from_slice(p);
        }
        let mut b = (alpn.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(&alpn);
        ext(&mut exts, 0x0010, &b);
    }
    ext(&mut exts, 0x0005, &[1, 0, 0, 0, 0]); // status_request
    ext(
        &mut exts,
        0x000d,
        &vec16(&[
            0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
        ]),
    ); // signature_algorithms
    ext(&mut exts, 0x0012, &[]); // signed_certificate_timestamp
    {
        // key_share: GREASE share of one byte, then X25519
        let mut shares = Vec::new();
        shares.extend_from_slice(&[0x2a, 0x2a, 0x00, 0x01, 0x00]);
        shares.extend_from_slice(&[0x00, 0x1d, 0x00, 0x20]);
        shares.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)));
        let mut b = (shares.len() as u16).to_be_bytes().to_vec();
        b.extend_from_slice(&shares);
        ext(&mut exts, 0x0033, &b);
    }
    ext(&mut exts, 0x002d, &[1, 1]); // psk_key_exchange_modes
    ext(&mut exts, 0x002b, &[6, 0x6a, 0x6a, 0x03, 0x04, 0x03, 0x03]); // supported_versions
    ext(&mut exts, 0x001b, &[2, 0, 2]); // compress_certificate
    ext(&mut exts, 0x1a1a, &[0]); // GREASE

    let mut hello = Vec::new();
    hello.extend_from_slice(&[0x03, 0x03]); // legacy_version
    hello.extend((0..32u8).map(|i| i.wrapping_mul(7).wrapping_add(3))); // random
    hello.push(32); // legacy_session_id
    hello.extend((0..32u8).map(|i| i.wrapping_mul(13).wrapping_add(5)));
    let suites = [
        0x3a3a, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013,
        0xc014, 0x009c, 0x009d, 0x002f, 0x0035,
    ];
    hello.extend_from_slice(&vec16(&suites));
    hello.extend_from_slice(&[1, 0]); // compression: null
    // Padding (RFC 7685) brings the handshake message to 512 bytes with its 4-byte header,
    // as Chrome does.
    let without_pad = hello.len() + 2 + exts.len();
    if without_pad + 4 < 508 {
        let pad = 508 - without_pad - 4;
        ext(&mut exts, 0x0015, &vec![0; pad]);
    }
    hello.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    hello.extend_from_slice(&exts);

    let mut hs = vec![0x01];
    hs.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&hello);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// A FIX.4.4 Logon (35=A) with `username` in tag 553, BodyLength and CheckSum computed.
pub fn fix_logon(username: &str) -> Vec<u8> {
    let body = format!(
        "35=A\x0134=1\x0149=CLIENT7\x0152=20240101-00:00:00.000\x0156=EXCHANGE\x0198=0\x01108=30\x01141=Y\x01553={username}\x01554=c2VjcmV0LXNpZ25hdHVyZQ==\x01"
    );
    let head = format!("8=FIX.4.4\x019={}\x01", body.len());
    let mut msg = format!("{head}{body}").into_bytes();
    let sum = msg.iter().map(|b| u32::from(*b)).sum::<u32>() % 256;
    msg.extend_from_slice(format!("10={sum:03}\x01").as_bytes());
    msg
}

/// A PROXY protocol v2 header (PROXY command, TCP over IPv4) naming the client, followed by
/// `inner`.
pub fn proxy_v2(client: [u8; 4], server: [u8; 4], sport: u16, dport: u16, inner: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x21); // version 2, PROXY
    h.push(0x11); // AF_INET, STREAM
    h.extend_from_slice(&12u16.to_be_bytes());
    h.extend_from_slice(&client);
    h.extend_from_slice(&server);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(inner);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hello_lengths_are_consistent() {
        let sni = "k-k00001f4.api.test";
        let r = tls_client_hello(sni);
        assert_eq!(r[0], 0x16);
        let rec_len = u16::from_be_bytes([r[3], r[4]]) as usize;
        assert_eq!(rec_len, r.len() - 5);
        let hs_len = u32::from_be_bytes([0, r[6], r[7], r[8]]) as usize;
        assert_eq!(hs_len, r.len() - 9);
        assert_eq!(hs_len, 508, "padded like Chrome");
        // Walk the extensions and find the SNI.
        let mut p = 9 + 2 + 32;
        p += 1 + r[p] as usize; // session id
        p += 2 + u16::from_be_bytes([r[p], r[p + 1]]) as usize; // suites
        p += 1 + r[p] as usize; // compression
        let end = p + 2 + u16::from_be_bytes([r[p], r[p + 1]]) as usize;
        assert_eq!(end, r.len());
        p += 2;
        let mut found = None;
        while p < end {
            let typ = u16::from_be_bytes([r[p], r[p + 1]]);
            let len = u16::from_be_bytes([r[p + 2], r[p + 3]]) as usize;
            if typ == 0 {
                let n = u16::from_be_bytes([r[p + 7], r[p + 8]]) as usize;
                found = Some(String::from_utf8(r[p + 9..p + 9 + n].to_vec()).unwrap());
            }
            p += 4 + len;
        }
        assert_eq!(p, end);
        assert_eq!(found.as_deref(), Some(sni));
    }

    #[test]
    fn fix_logon_has_valid_length_and_checksum() {
        let m = fix_logon("k00001f4abcdef");
        let s = String::from_utf8(m.clone()).unwrap();
        let fields: Vec<&str> = s.trim_end_matches('\x01').split('\x01').collect();
        assert_eq!(fields[0], "8=FIX.4.4");
        let body_len: usize = fields[1].strip_prefix("9=").unwrap().parse().unwrap();
        let body_start = fields[0].len() + fields[1].len() + 2;
        let ck = s.rfind("10=").unwrap();
        assert_eq!(ck - body_start, body_len);
        let sum = m[..ck].iter().map(|b| u32::from(*b)).sum::<u32>() % 256;
        assert_eq!(fields.last().unwrap(), &format!("10={sum:03}"));
        assert!(fields.contains(&"35=A") && fields.contains(&"553=k00001f4abcdef"));
    }

    #[test]
    fn proxy_v2_header_is_28_bytes_before_the_request() {
        let p = proxy_v2(
            [10, 0, 0, 1],
            [192, 0, 2, 1],
            5555,
            8081,
            b"GET / HTTP/1.1\r\n\r\n",
        );
        assert_eq!(&p[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(u16::from_be_bytes([p[14], p[15]]), 12);
        assert_eq!(&p[28..31], b"GET");
    }
}
