//! A home that lists several relay nodes (issue #14 point 5) connects to the first that answers: a node that never
//! answers costs at most the connect timeout, a node whose certificate does not match its pin is never used, and
//! when every node fails the error names each address with what went wrong there.

use std::time::Duration;

use relay_client::Messenger;
use relay_client::home::Home;
use relay_tests::TestRelay;

use crate::WAIT;

const ALICE: &str = "+33612345678";
const BOB: &str = "+33698765432";
/// What a node that does not answer may cost (short, so the test stays quick; the default is 5 s).
const TIMEOUT: Duration = Duration::from_millis(400);

/// Lists `servers` (a comma list) as the home's relay nodes, keeping its pin.
fn list_nodes(home: &Home, servers: &str) {
    let mut profile = home.profile().expect("profile");
    let relay = profile.relay.as_mut().expect("registered");
    relay.server = servers.to_owned();
    home.save_profile(&profile).expect("save");
}

#[tokio::test]
async fn a_home_reaches_its_relay_through_whichever_listed_node_answers() {
    let relay = TestRelay::in_process().await.expect("relay");
    let impostor = TestRelay::in_process().await.expect("a relay with another certificate");
    // A UDP socket that never answers: a node that is down (or whose packets are dropped).
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent = silent.local_addr().expect("addr");
    let alice = relay.user(ALICE).await.expect("alice");
    let mut bob = relay.user(BOB).await.expect("bob");

    // Silent node first, then the impostor (right address, wrong certificate), then the relay.
    list_nodes(&alice.home, &format!("{silent},{},{}", impostor.addr(), relay.addr()));
    let mut m = Messenger::open_via(&alice.home, TIMEOUT).await.expect("reached through the third node");
    assert_eq!(m.relay_address(), relay.addr().to_string(), "the node that answered with the pinned certificate");
    m.send_text(BOB, "via the third node").await.expect("send");
    let got = bob.messenger.receive(1, WAIT).await.expect("receive");
    assert_eq!(got.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(), ["via the third node"]);

    // Every node failing: one error naming each address.
    list_nodes(&alice.home, &format!("{silent},{}", impostor.addr()));
    let err = Messenger::open_via(&alice.home, TIMEOUT).await.err().expect("no node to use");
    let text = err.to_string();
    assert!(text.contains(&silent.to_string()) && text.contains(&impostor.addr().to_string()), "{text}");
    assert!(text.contains("no answer within"), "the silent node timed out: {text}");
}

/// `relay chat` outlives its relay's restart: when the connection is lost it reconnects by itself, and a line typed
/// afterwards reaches the peer. Before, the chat ended with "relay closed the connection".
#[tokio::test]
async fn chat_reconnects_after_its_relay_is_killed_and_restarted() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let mut relay = TestRelay::process().await.expect("relayd child");
    let alice = relay.user(ALICE).await.expect("alice");
    let bob = relay.user(BOB).await.expect("bob");
    let mut chat = tokio::process::Command::new(relay_tests::binary_path("relay", "RELAY_BIN").expect("relay CLI"))
        .arg("--home")
        .arg(alice.home.dir())
        .args(["chat", "--to", BOB])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("chat");
    let mut stdin = chat.stdin.take().expect("stdin");
    let mut stderr = BufReader::new(chat.stderr.take().expect("stderr")).lines();
    let mut wait_for = async |needle: &str| {
        while let Some(line) = stderr.next_line().await.expect("stderr") {
            if line.contains(needle) {
                return;
            }
        }
        panic!("the chat ended before printing {needle:?}");
    };
    tokio::time::timeout(WAIT, wait_for("chatting with")).await.expect("chat started");

    relay.kill().await.expect("kill");
    relay.restart().await.expect("restart");
    // A killed relay sends nothing: the chat notices when its connection idles out (20 s), then reconnects.
    let noticed = relay_client::connection::CLIENT_IDLE_TIMEOUT + WAIT;
    tokio::time::timeout(noticed, wait_for("reconnected")).await.expect("chat reconnected");
    stdin.write_all(b"after the restart\n").await.expect("type");
    // Bob's own connection died with the relay too: he connects again.
    let mut bob = Messenger::open(&bob.home).await.expect("bob again");
    let got = bob.receive(1, WAIT).await.expect("receive");
    assert_eq!(got.iter().map(|r| r.text.as_str()).collect::<Vec<_>>(), ["after the restart"]);
    drop(stdin);
    let status = tokio::time::timeout(WAIT, chat.wait()).await.expect("chat ended").expect("status");
    assert!(status.success(), "{status}");
}
