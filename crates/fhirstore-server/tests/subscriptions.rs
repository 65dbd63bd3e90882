//! R4 Subscriptions delivered to a real HTTP receiver on loopback: exactly the matching events
//! per tenant, numbered without gaps; retries, `error` and reactivation; a server killed at
//! random points and restarted; two processes sharing one PostgreSQL.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use fhirstore_server::config::{ServerSettings, StoreSettings};
use fhirstore_server::subscriptions::Settings;
use fhirstore_testkit::postgres::OwnDatabase;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::Notify;

// ---------------------------------------------------------------- the receiver

/// What the receiver answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Ok,
    Fail,
    Hang,
}

/// A notification as received, with its Authorization header.
type Received = (Value, Option<String>);

#[derive(Default)]
struct Inbox {
    /// Every notification by hook name, in arrival order.
    got: Mutex<BTreeMap<String, Vec<Received>>>,
    /// Requests answered, failures included.
    requests: AtomicUsize,
    /// Requests to fail before answering 200 again (with `Mode::Ok`).
    fail_next: AtomicUsize,
    mode: Mutex<Option<Mode>>,
    /// Time to take per request, ms.
    slow_ms: AtomicUsize,
    arrived: Notify,
}

struct Receiver {
    port: u16,
    inbox: Arc<Inbox>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hook(
    State(inbox): State<Arc<Inbox>>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    inbox.requests.fetch_add(1, Ordering::SeqCst);
    let slow = inbox.slow_ms.load(Ordering::SeqCst);
    if slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow as u64)).await;
    }
    let mode = (*inbox.mode.lock()).unwrap_or(Mode::Ok);
    match mode {
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return StatusCode::OK;
        }
        Mode::Fail => return StatusCode::INTERNAL_SERVER_ERROR,
        Mode::Ok => {}
    }
    if inbox
        .fail_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST;
    };
    let auth = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    inbox.got.lock().entry(name).or_default().push((v, auth));
    inbox.arrived.notify_waiters();
    StatusCode::OK
}

async fn receiver() -> Receiver {
    let inbox = Arc::new(Inbox::default());
    let app = axum::Router::new()
        .route("/hook/{name}", post(hook))
        .with_state(inbox.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver { port, inbox, task }
}

impl Receiver {
    fn prefix(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/hook/{name}", self.port)
    }

    fn set(&self, mode: Mode) {
        *self.inbox.mode.lock() = Some(mode);
    }

    fn notes(&self, name: &str) -> Vec<Value> {
        self.inbox
            .got
            .lock()
            .get(name)
            .map(|v| v.iter().map(|(n, _)| n.clone()).collect())
            .unwrap_or_default()
    }

    /// Waits until `done` holds for the notifications to `name`; panics with what arrived
    /// when it does not within `within`.
    async fn wait(
        &self,
        name: &str,
        within: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let arrived = self.inbox.arrived.notified();
            let notes = self.notes(name);
            if done(&notes) {
                return notes;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let notes = self.notes(name);
                assert!(
                    done(&notes),
                    "{name}: the receiver did not get what was expected within {within:?}; got {} \
                     notifications, numbers {:?}",
                    notes.len(),
                    numbers(&notes)
                );
                return notes;
            }
        }
    }
}

// ---------------------------------------------------------------- reading notifications

fn status_param<'a>(note: &'a Value, name: &str) -> Option<&'a Value> {
    note["entry"][0]["resource"]["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

fn kind(note: &Value) -> &str {
    status_param(note, "type")
        .and_then(|p| p["valueCode"].as_str())
        .unwrap_or("")
}

/// The named part of each `notification-event` a notification carries, in order.
fn event_parts<'a>(note: &'a Value, part: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    note["entry"][0]["resource"]["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "notification-event")
        .filter_map(move |p| p["part"].as_array()?.iter().find(|q| q["name"] == part))
}

/// The event numbers a notification carries.
fn event_numbers(note: &Value) -> Vec<i64> {
    event_parts(note, "event-number")
        .filter_map(|q| q["valueString"].as_str()?.parse().ok())
        .collect()
}

/// Every event number in arrival order, heartbeats left out.
fn numbers(notes: &[Value]) -> Vec<i64> {
    notes
        .iter()
        .filter(|n| kind(n) == "event-notification")
        .flat_map(event_numbers)
        .collect()
}

/// The focus references in arrival order, as `Type/id/_history/v` (the part after the
/// tenant's base, whichever server process sent them).
fn foci(notes: &[Value]) -> Vec<String> {
    notes
        .iter()
        .filter(|n| kind(n) == "event-notification")
        .flat_map(|n| {
            event_parts(n, "focus")
                .filter_map(|q| {
                    let after = q["valueReference"]["reference"]
                        .as_str()?
                        .split_once("/fhir/")?
                        .1;
                    Some(after.split_once('/')?.1.to_owned())
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Numbers 1..=n, each at least once, first arrivals in order.
fn complete_in_order(nums: &[i64], n: i64) -> bool {
    let mut next = 1;
    for &k in nums {
        if k == next {
            next += 1;
        } else if k > next {
            return false;
        }
    }
    next == n + 1
}

fn subscription(criteria: &str, endpoint: &str, payload: Option<&str>) -> Value {
    let mut channel = json!({"type": "rest-hook", "endpoint": endpoint,
        "header": ["Authorization: Bearer secret-token"]});
    match payload {
        Some("id-only") => {
            channel["payload"] = json!("application/fhir+json");
            channel["_payload"] = json!({"extension": [{
                "url": fhirstore_core::subscription::PAYLOAD_CONTENT_URL, "valueCode": "id-only"}]});
        }
        Some(p) => channel["payload"] = json!(p),
        None => {}
    }
    json!({"resourceType": "Subscription", "status": "requested", "reason": "test",
        "criteria": criteria, "channel": channel})
}

fn settings_for(r: &Receiver) -> ServerSettings {
    ServerSettings {
        subscriptions: Settings {
            endpoints: vec![r.prefix()],
            retry_base: Duration::from_millis(50),
            poll: Duration::from_millis(50),
            ..Settings::default()
        },
        ..ServerSettings::default()
    }
}

// ---------------------------------------------------------------- admission

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_what_can_be_served_is_admitted() {
    let r = receiver().await;
    let s = support::server(settings_for(&r)).await;
    let ok = s
        .post(
            "/fhir/t/Subscription",
            &subscription("Observation?code=1234-5", &r.url("x"), None),
        )
        .await;
    assert_eq!(
        ok.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&ok.body)
    );
    assert_eq!(
        ok.json()["status"],
        "active",
        "a requested subscription is activated"
    );
    let refused = [
        subscription("Observation?nonsense=1", &r.url("x"), None),
        subscription("Observation?code=1&_sort=date", &r.url("x"), None),
        subscription("Observation?code=1", "http://127.0.0.1:1/elsewhere", None),
        subscription("Observation?code=1", "https://127.0.0.1/x", None),
        subscription("Observation?code=1", "https://169.254.169.254/latest", None),
        subscription(
            "Observation?code=1",
            &r.url("x"),
            Some("application/fhir+xml"),
        ),
        {
            let mut v = subscription("Observation?code=1", &r.url("x"), None);
            v["channel"]["type"] = json!("websocket");
            v
        },
        {
            let mut v = subscription("Observation?code=1", &r.url("x"), None);
            v["channel"]["header"] = json!(["X-A: 1\r\nX-B: 2"]);
            v
        },
    ];
    for body in refused {
        let resp = s.post("/fhir/t/Subscription", &body).await;
        assert_eq!(resp.status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(resp.issue(), "invalid");
    }
    // The same rule holds in a transaction.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "resource": subscription("Observation?code=1", "http://10.0.0.1/x", None),
        "request": {"method": "POST", "url": "Subscription"}}]});
    let resp = s.post("/fhir/t", &tx).await;
    assert_eq!(resp.status, StatusCode::UNPROCESSABLE_ENTITY);
}

// ---------------------------------------------------------------- two tenants

/// What one subscription should hear, in order: `Type/id/_history/v`.
type Expected = Vec<String>;

async fn two_tenants(stores: &StoreSettings, dir: tempfile::TempDir) {
    let r = receiver().await;
    let s = support::server_on(dir, stores, settings_for(&r))
        .await
        .expect("open the stores");
    let u = uuid::Uuid::now_v7().simple().to_string();
    let (ta, tb) = (format!("a-{}", &u[20..]), format!("b-{}", &u[20..]));
    let engine = s.app.subscriptions.clone();
    let loops = engine.start().await;

    let code = "http://loinc.org|1111-1";
    let subs = [
        (
            "a-obs",
            &ta,
            format!("Observation?code={code}"),
            Some("application/fhir+json"),
        ),
        (
            "a-fem",
            &ta,
            "Patient?gender=female".to_owned(),
            Some("id-only"),
        ),
        (
            "a-chain",
            &ta,
            "Observation?subject:Patient.gender=female".to_owned(),
            Some("id-only"),
        ),
        (
            "b-obs",
            &tb,
            format!("Observation?code={code}"),
            Some("id-only"),
        ),
        ("b-fem", &tb, "Patient?gender=female".to_owned(), None),
    ];
    let mut sub_ids = HashMap::new();
    for (name, tenant, criteria, payload) in &subs {
        let resp = s
            .post(
                &format!("/fhir/{tenant}/Subscription"),
                &subscription(criteria, &r.url(name), *payload),
            )
            .await;
        assert_eq!(resp.status, StatusCode::CREATED);
        sub_ids.insert(*name, resp.json()["id"].as_str().unwrap_or("").to_owned());
    }

    // 500 writes across both tenants; the expected events follow from what each write is.
    let mut expected: HashMap<&str, Expected> = HashMap::new();
    let mut female: HashMap<(String, String), bool> = HashMap::new();
    let mut obs: Vec<(String, String)> = Vec::new();
    for i in 0..500 {
        let tenant = if i % 2 == 0 { &ta } else { &tb };
        let side = if i % 2 == 0 { "a" } else { "b" };
        match i % 10 {
            0 | 1 | 6 | 7 => {
                let gender = if i % 4 < 2 { "female" } else { "male" };
                let id = format!("p{i}");
                let resp = s
                    .put(
                        &format!("/fhir/{tenant}/Patient/{id}"),
                        &json!({"resourceType": "Patient", "id": id, "gender": gender}),
                    )
                    .await;
                assert_eq!(resp.status, StatusCode::CREATED);
                female.insert((side.to_owned(), id.clone()), gender == "female");
                if gender == "female" {
                    expected
                        .entry(if side == "a" { "a-fem" } else { "b-fem" })
                        .or_default()
                        .push(format!("Patient/{id}/_history/1"));
                }
            }
            2 | 3 | 8 | 9 => {
                let matching = i % 10 < 8;
                let subject = female
                    .keys()
                    .filter(|(sd, _)| sd == side)
                    .map(|(_, id)| id.clone())
                    .max()
                    .unwrap_or_else(|| "none".to_owned());
                let id = format!("o{i}");
                let body = json!({"resourceType": "Observation", "id": id, "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org",
                        "code": if matching { "1111-1" } else { "2222-2" }}]},
                    "subject": {"reference": format!("Patient/{subject}")}});
                let resp = s
                    .put(&format!("/fhir/{tenant}/Observation/{id}"), &body)
                    .await;
                assert_eq!(resp.status, StatusCode::CREATED);
                let version = format!("Observation/{id}/_history/1");
                if matching {
                    expected
                        .entry(if side == "a" { "a-obs" } else { "b-obs" })
                        .or_default()
                        .push(version.clone());
                }
                if side == "a" && female.get(&("a".to_owned(), subject)).copied() == Some(true) {
                    expected.entry("a-chain").or_default().push(version);
                }
                obs.push((tenant.clone(), id));
            }
            4 | 5 if (i / 10) % 2 == 0 => {
                // A deletion of a matching Observation is an event too.
                if let Some((t, id)) = obs.iter().rev().find(|(t, _)| t == tenant).cloned() {
                    let was = s.get(&format!("/fhir/{t}/Observation/{id}")).await;
                    if was.status == StatusCode::OK {
                        let body = was.json();
                        let resp = s.delete(&format!("/fhir/{t}/Observation/{id}")).await;
                        assert!(resp.status.is_success());
                        let version = format!("Observation/{id}/_history/2");
                        if body["code"]["coding"][0]["code"] == "1111-1" {
                            expected
                                .entry(if side == "a" { "a-obs" } else { "b-obs" })
                                .or_default()
                                .push(version.clone());
                        }
                        let subject = body["subject"]["reference"]
                            .as_str()
                            .unwrap_or("")
                            .trim_start_matches("Patient/")
                            .to_owned();
                        if side == "a"
                            && female.get(&("a".to_owned(), subject)).copied() == Some(true)
                        {
                            expected.entry("a-chain").or_default().push(version);
                        }
                    }
                }
            }
            _ => {
                // Neither tenant's subscriptions care about a Practitioner.
                let id = format!("pr{i}");
                s.put(
                    &format!("/fhir/{tenant}/Practitioner/{id}"),
                    &json!({"resourceType": "Practitioner", "id": id}),
                )
                .await;
            }
        }
    }

    for (name, tenant, _, payload) in &subs {
        let want = expected.get(name).cloned().unwrap_or_default();
        assert!(!want.is_empty(), "{name} expects events");
        let n = want.len() as i64;
        let notes = r
            .wait(name, Duration::from_secs(60), |notes| {
                complete_in_order(&numbers(notes), n)
            })
            .await;
        let nums = numbers(&notes);
        assert_eq!(
            nums,
            (1..=n).collect::<Vec<_>>(),
            "{name}: each event once, numbered without gaps"
        );
        let other = if **tenant == ta { &tb } else { &ta };
        for note in &notes {
            let text = note.to_string();
            assert!(
                !text.contains(&format!("/fhir/{other}/")),
                "{name} heard of the other tenant: {text}"
            );
            let sub_ref = status_param(note, "subscription").expect("subscription")
                ["valueReference"]["reference"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            assert!(sub_ref.ends_with(&format!("/fhir/{tenant}/Subscription/{}", sub_ids[name])));
        }
        if payload.is_some() {
            assert_eq!(foci(&notes), want, "{name}: exactly the matching changes");
        } else {
            assert!(
                foci(&notes).is_empty(),
                "{name}: an empty payload names nothing"
            );
        }
        let (_, auth) = r.inbox.got.lock()[*name][0].clone();
        assert_eq!(auth.as_deref(), Some("Bearer secret-token"));
    }

    // The full-resource payload carries each version; a deletion carries none.
    let notes = r.notes("a-obs");
    let with_body = notes
        .iter()
        .filter(|n| n["entry"][1]["resource"]["resourceType"] == "Observation")
        .count();
    let deletes = notes
        .iter()
        .filter(|n| n["entry"][1]["request"]["method"] == "DELETE")
        .count();
    assert!(deletes > 0);
    assert_eq!(with_body + deletes, notes.len());

    // `$events` replays any range, and `$status` counts what happened.
    let id = &sub_ids["a-obs"];
    let replay = s
        .get(&format!(
            "/fhir/{ta}/Subscription/{id}/$events?eventsSinceNumber=10&eventsUntilNumber=20"
        ))
        .await;
    assert_eq!(replay.status, StatusCode::OK);
    let replay = replay.json();
    assert_eq!(kind(&replay), "query-event");
    assert_eq!(event_numbers(&replay), (10..=20).collect::<Vec<_>>());
    let base = format!("http://fhir.test/fhir/{ta}");
    let want = &expected["a-obs"][9..20];
    let got: Vec<String> = replay["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .skip(1)
        .map(|e| {
            e["fullUrl"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches(&base)
                .trim_start_matches('/')
                .to_owned()
        })
        .collect();
    let want_keys: Vec<String> = want
        .iter()
        .map(|v| v.split("/_history").next().unwrap_or("").to_owned())
        .collect();
    assert_eq!(got, want_keys);
    let status = s
        .get(&format!("/fhir/{ta}/Subscription/{id}/$status"))
        .await
        .json();
    let status = &status["entry"][0]["resource"];
    let events = status["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "events-since-subscription-start")
        .and_then(|p| p["valueString"].as_str())
        .unwrap_or("");
    assert_eq!(events, expected["a-obs"].len().to_string());
    // Another tenant cannot see the subscription at all.
    assert_eq!(
        s.get(&format!("/fhir/{tb}/Subscription/{id}/$events"))
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // The admin status and the metrics show each subscription's delivery.
    let admin = s.get("/admin/status").await.json();
    let shown = admin["subscriptions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["id"] == id.as_str() && x["tenant"] == ta.as_str())
        .cloned()
        .expect("the subscription in /admin/status");
    assert_eq!(shown["lag"], 0);
    assert!(shown["lastDelivery"].is_string());
    let metrics = String::from_utf8(s.get("/metrics").await.body).unwrap_or_default();
    assert!(metrics.contains(&format!(
        "fhirstore_subscription_lag_events{{tenant=\"{ta}\",subscription=\"{id}\"}} 0"
    )));

    engine.stop();
    for t in loops {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_hear_exactly_their_events_on_sqlite() {
    let (dir, stores) = on_sqlite();
    two_tenants(&stores, dir).await;
}

/// A fresh SQLite store's directory and settings.
fn on_sqlite() -> (tempfile::TempDir, StoreSettings) {
    let dir = tempfile::tempdir().expect("temp dir");
    let stores = support::store_settings(dir.path());
    (dir, stores)
}

/// A PostgreSQL database of the test's own (dropped with the first value), a data directory,
/// and the settings naming both; `None` when PostgreSQL is not there and not required.
async fn on_postgres() -> Option<(OwnDatabase, tempfile::TempDir, StoreSettings)> {
    let db = OwnDatabase::create().await?;
    let dir = tempfile::tempdir().expect("temp dir");
    let stores = StoreSettings {
        postgres: Some(db.url().to_owned()),
        ..support::store_settings(dir.path())
    };
    Some((db, dir, stores))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_hear_exactly_their_events_on_postgres() {
    let Some((_db, dir, stores)) = on_postgres().await else {
        return;
    };
    two_tenants(&stores, dir).await;
}

// ---------------------------------------------------------------- failing receiver

async fn subscription_status(s: &support::Srv, tenant: &str, id: &str) -> Value {
    s.get(&format!("/fhir/{tenant}/Subscription/{id}"))
        .await
        .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_then_errors_and_resumes_on_sqlite() {
    let (dir, stores) = on_sqlite();
    failing_receiver(&stores, dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_is_retried_then_errors_and_resumes_on_postgres() {
    let Some((_db, dir, stores)) = on_postgres().await else {
        return;
    };
    failing_receiver(&stores, dir).await;
}

/// Retries with backoff, `error` past the retry period, events recorded meanwhile, and
/// delivery resumed at the first event not delivered once reactivated; then delivered events
/// pruned.
async fn failing_receiver(stores: &StoreSettings, dir: tempfile::TempDir) {
    let r = receiver().await;
    let mut settings = settings_for(&r);
    settings.subscriptions.retry_period = Duration::from_millis(1_500);
    settings.subscriptions.timeout = Duration::from_millis(300);
    let s = support::server_on(dir, stores, settings)
        .await
        .expect("open the stores");
    let engine = s.app.subscriptions.clone();
    let loops = engine.start().await;
    let created = s
        .post(
            "/fhir/t/Subscription",
            &subscription("Patient?gender=female", &r.url("f"), Some("id-only")),
        )
        .await
        .json();
    let id = created["id"].as_str().unwrap_or("").to_owned();
    let write = |n: usize| {
        let s = &s;
        async move {
            let resp = s
                .put(
                    &format!("/fhir/t/Patient/p{n}"),
                    &json!({"resourceType": "Patient", "id": format!("p{n}"), "gender": "female"}),
                )
                .await;
            assert!(resp.status.is_success());
        }
    };

    // Three failures, then success: retried with backoff until delivered.
    r.inbox.fail_next.store(3, Ordering::SeqCst);
    write(1).await;
    r.wait("f", Duration::from_secs(20), |n| numbers(n) == [1])
        .await;
    assert!(
        r.inbox.requests.load(Ordering::SeqCst) >= 4,
        "the failures were retried"
    );

    // A receiver that hangs past the timeout, then fails, for longer than the retry period:
    // the subscription goes to `error` with the reason.
    r.set(Mode::Hang);
    write(2).await;
    write(3).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let sub = loop {
        let sub = subscription_status(&s, "t", &id).await;
        if sub["status"] == "error" {
            break sub;
        }
        if Instant::now() > deadline {
            panic!("the subscription never went to error: {sub}");
        }
        if r.inbox.requests.load(Ordering::SeqCst) > 6 {
            r.set(Mode::Fail);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = sub["error"].as_str().unwrap_or("");
    assert!(
        reason.contains("500") || reason.contains("no answer"),
        "the reason is named: {reason}"
    );
    // Events go on being recorded while it is in error.
    write(4).await;

    // Reactivated once the receiver is back: delivery resumes at event 2, in order.
    r.set(Mode::Ok);
    let mut body = sub.clone();
    body["status"] = json!("active");
    let resp = s.put(&format!("/fhir/t/Subscription/{id}"), &body).await;
    assert_eq!(resp.status, StatusCode::OK);
    let notes = r
        .wait("f", Duration::from_secs(20), |n| {
            complete_in_order(&numbers(n), 4)
        })
        .await;
    let nums = numbers(&notes);
    assert_eq!(
        nums,
        vec![1, 2, 3, 4],
        "resumed from the first undelivered event"
    );
    assert_eq!(
        foci(&notes),
        (1..=4)
            .map(|n| format!("Patient/p{n}/_history/1"))
            .collect::<Vec<_>>()
    );
    // Delivered events past the retention are pruned; `$status` still counts them.
    let primary = s.app.store.composite().primary().clone();
    let (tenant, sub_id) = (
        fhirstore_core::TenantId::new("t").expect("tenant"),
        fhirstore_core::LogicalId::new(id.as_str()).expect("id"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while primary
        .subscription_state(&tenant, &sub_id)
        .await
        .expect("state")
        .is_some_and(|st| st.delivered < 4)
    {
        assert!(
            Instant::now() < deadline,
            "the deliveries were never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pruned = primary
        .prune_events(fhirstore_core::now_micros() + 1, 1_000)
        .await
        .expect("prune");
    assert_eq!(pruned, 4);
    let replay = s
        .get(&format!(
            "/fhir/t/Subscription/{id}/$events?eventsSinceNumber=1"
        ))
        .await
        .json();
    assert!(event_numbers(&replay).is_empty());
    assert_eq!(
        status_param(&replay, "events-since-subscription-start").map(|p| p["valueString"].clone()),
        Some(json!("4"))
    );
    engine.stop();
    for t in loops {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------- real processes

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One HTTP/1.1 exchange on a fresh connection: the status and the body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> std::io::Result<(u16, Value)> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let payload = body.map(Value::to_string).unwrap_or_default();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\
         content-type: application/fhir+json\r\ncontent-length: {}\r\n\r\n{payload}",
        payload.len()
    )?;
    let mut reply = Vec::new();
    c.read_to_end(&mut reply)?;
    let text = String::from_utf8_lossy(&reply);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Chunked bodies are not expected: the server answers with a length.
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

fn start(data: &Path, receiver: &Receiver, postgres: Option<&str>) -> Server {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fhirstore"));
    cmd.arg("--data-dir").arg(data);
    if let Some(url) = postgres {
        cmd.args(["--postgres", url]);
    }
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--subscription-endpoint",
        &receiver.prefix(),
        "--subscription-retry-base",
        "50ms",
    ])
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null());
    let mut child = cmd.spawn().expect("start the server");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http(port, "GET", "/health", None).is_ok_and(|(s, _)| s == 200) {
        assert!(Instant::now() < deadline, "the server did not come up");
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the server exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, port }
}

/// A byte of randomness, for kill points.
fn random_below(n: u64) -> u64 {
    u64::from(uuid::Uuid::new_v4().as_bytes()[0]) * n / 256
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_at_random_points_loses_no_notification_on_sqlite() {
    killed_at_random_points(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_at_random_points_loses_no_notification_on_postgres() {
    let Some(db) = OwnDatabase::create().await else {
        return;
    };
    killed_at_random_points(Some(db.url())).await;
}

/// Writes while the server process is killed at random points and restarted, five times.
async fn killed_at_random_points(postgres: Option<&str>) {
    let r = receiver().await;
    // A slow receiver keeps a backlog, so kills land during delivery too.
    r.inbox.slow_ms.store(5, Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_owned();
    let mut server = start(&data, &r, postgres);
    let (status, sub) = http(
        server.port,
        "POST",
        "/fhir/k/Subscription",
        Some(&subscription(
            "Observation?code=k",
            &r.url("k"),
            Some("id-only"),
        )),
    )
    .expect("create the subscription");
    assert_eq!(status, 201, "{sub}");
    let id = sub["id"].as_str().unwrap_or("").to_owned();
    let mut written = 0usize;
    for round in 0..5 {
        // Writes run on a thread of their own while the process is killed under them.
        let port = server.port;
        let start_at = written;
        let writer = std::thread::spawn(move || {
            let mut done = 0;
            for i in 0..60 {
                let n = start_at + i;
                let body = json!({"resourceType": "Observation", "id": format!("o{round}-{n}"),
                    "status": "final", "code": {"coding": [{"code": "k"}]}});
                match http(
                    port,
                    "PUT",
                    &format!("/fhir/k/Observation/o{round}-{n}"),
                    Some(&body),
                ) {
                    Ok((s, _)) if (200..300).contains(&s) => done += 1,
                    _ => break,
                }
            }
            done
        });
        std::thread::sleep(Duration::from_millis(20 + random_below(400)));
        let _ = server.child.kill();
        let _ = server.child.wait();
        written += writer.join().unwrap_or(0);
        server = start(&data, &r, postgres);
    }
    // Every Observation stored is one event; a write cut off by a kill may have committed.
    let (_, count) = http(
        server.port,
        "GET",
        "/fhir/k/Observation?_summary=count",
        None,
    )
    .expect("count");
    let n = count["total"].as_i64().unwrap_or(0);
    assert!(
        n >= written as i64 && written > 0,
        "{n} stored, {written} acknowledged"
    );
    let notes = r
        .wait("k", Duration::from_secs(120), |notes| {
            complete_in_order(&numbers(notes), n)
        })
        .await;
    let nums = numbers(&notes);
    assert!(
        nums.iter().all(|&k| (1..=n).contains(&k)),
        "no event beyond the writes"
    );
    // Each Observation was notified (at least once), and duplicates repeat their number.
    let mut by_number: BTreeMap<i64, String> = BTreeMap::new();
    let foci = foci(&notes);
    for (note, focus) in notes.iter().flat_map(event_numbers).zip(foci.iter()) {
        let key = focus.split("/_history").next().unwrap_or("").to_owned();
        let seen = by_number.entry(note).or_insert_with(|| key.clone());
        assert_eq!(
            *seen, key,
            "a duplicate carries the same event as its number"
        );
    }
    let distinct: std::collections::BTreeSet<&String> = by_number.values().collect();
    assert_eq!(
        distinct.len() as i64,
        n,
        "every stored Observation was notified once by number"
    );
    // `$events` returns any range asked for.
    let (status, replay) = http(
        server.port,
        "GET",
        &format!("/fhir/k/Subscription/{id}/$events?eventsSinceNumber=5&eventsUntilNumber={n}"),
        None,
    )
    .expect("$events");
    assert_eq!(status, 200);
    assert_eq!(event_numbers(&replay), (5..=n).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_postgres_deliver_each_event_once() {
    let Some(db) = OwnDatabase::create().await else {
        return;
    };
    let r = receiver().await;
    let (d1, d2) = (
        tempfile::tempdir().expect("temp dir"),
        tempfile::tempdir().expect("temp dir"),
    );
    let one = start(d1.path(), &r, Some(db.url()));
    let two = start(d2.path(), &r, Some(db.url()));
    let mut ids = Vec::new();
    for k in 0..4 {
        let port = if k % 2 == 0 { one.port } else { two.port };
        let (status, sub) = http(
            port,
            "POST",
            "/fhir/pg/Subscription",
            Some(&subscription(
                &format!("Observation?code=c{k}"),
                &r.url(&format!("s{k}")),
                None,
            )),
        )
        .expect("create");
        assert_eq!(status, 201, "{sub}");
        ids.push(sub["id"].as_str().unwrap_or("").to_owned());
    }
    let per_sub = 50;
    let (p1, p2) = (one.port, two.port);
    tokio::task::spawn_blocking(move || {
        for i in 0..per_sub * 4 {
            let port = if i % 2 == 0 { p1 } else { p2 };
            let body = json!({"resourceType": "Observation", "status": "final",
                "code": {"coding": [{"code": format!("c{}", i % 4)}]}});
            let (s, _) = http(port, "POST", "/fhir/pg/Observation", Some(&body)).expect("write");
            assert_eq!(s, 201);
        }
    })
    .await
    .expect("writer");
    for k in 0..4 {
        let notes = r
            .wait(&format!("s{k}"), Duration::from_secs(60), |n| {
                complete_in_order(&numbers(n), per_sub as i64)
            })
            .await;
        assert_eq!(
            numbers(&notes),
            (1..=per_sub as i64).collect::<Vec<_>>(),
            "s{k}: each event once between the two processes"
        );
    }
    drop((one, two));
}

// ---------------------------------------------------------------- heartbeats, slow endpoints

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_subscription_sends_heartbeats_on_sqlite() {
    let (dir, stores) = on_sqlite();
    heartbeats(&stores, dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_subscription_sends_heartbeats_on_postgres() {
    let Some((_db, dir, stores)) = on_postgres().await else {
        return;
    };
    heartbeats(&stores, dir).await;
}

async fn heartbeats(stores: &StoreSettings, dir: tempfile::TempDir) {
    let r = receiver().await;
    let s = support::server_on(dir, stores, settings_for(&r))
        .await
        .expect("open the stores");
    let engine = s.app.subscriptions.clone();
    let loops = engine.start().await;
    let mut body = subscription("Patient?gender=other", &r.url("hb"), None);
    body["channel"]["extension"] = json!([{
        "url": fhirstore_core::subscription::HEARTBEAT_URL, "valueUnsignedInt": 1}]);
    let created = s.post("/fhir/t/Subscription", &body).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let notes = r
        .wait("hb", Duration::from_secs(20), |n| {
            n.iter().filter(|x| kind(x) == "heartbeat").count() >= 2
        })
        .await;
    for n in notes.iter().filter(|x| kind(x) == "heartbeat") {
        assert_eq!(
            status_param(n, "events-since-subscription-start").map(|p| p["valueString"].clone()),
            Some(json!("0"))
        );
        assert!(event_numbers(n).is_empty());
    }
    engine.stop();
    for t in loops {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_hangs_stalls_no_other_subscription() {
    let slow = receiver().await;
    slow.set(Mode::Hang);
    let fast = receiver().await;
    let mut settings = settings_for(&fast);
    settings.subscriptions.endpoints.push(slow.prefix());
    settings.subscriptions.timeout = Duration::from_millis(500);
    settings.subscriptions.concurrency = 2;
    let s = support::server(settings).await;
    let engine = s.app.subscriptions.clone();
    let loops = engine.start().await;
    for (name, r) in [("slow", &slow), ("fast", &fast)] {
        let resp = s
            .post(
                "/fhir/t/Subscription",
                &subscription("Patient?gender=male", &r.url(name), None),
            )
            .await;
        assert_eq!(resp.status, StatusCode::CREATED);
    }
    for i in 0..20 {
        let resp = s
            .put(
                &format!("/fhir/t/Patient/m{i}"),
                &json!({"resourceType": "Patient", "id": format!("m{i}"), "gender": "male"}),
            )
            .await;
        assert!(resp.status.is_success());
    }
    // The hanging endpoint holds at most one delivery at a time, each cut at the timeout; the
    // other subscription is delivered meanwhile.
    let notes = fast
        .wait("fast", Duration::from_secs(20), |n| {
            complete_in_order(&numbers(n), 20)
        })
        .await;
    assert_eq!(numbers(&notes), (1..=20).collect::<Vec<_>>());
    assert!(slow.notes("slow").is_empty());
    let deadline = Instant::now() + Duration::from_secs(20);
    let stuck = loop {
        let admin = s.get("/admin/status").await.json();
        let stuck = admin["subscriptions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["lag"] == 20)
            .cloned()
            .expect("the hanging subscription shows its lag");
        if stuck["lastError"].is_string() {
            break stuck;
        }
        assert!(
            Instant::now() < deadline,
            "no timeout was recorded: {stuck}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        stuck["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("no answer within 500 ms"),
        "{stuck}"
    );
    engine.stop();
    for t in loops {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------- https

/// The last delivery error `$status` reports for a subscription.
async fn delivery_error(s: &support::Srv, tenant: &str, id: &str) -> Option<String> {
    let status = s
        .get(&format!("/fhir/{tenant}/Subscription/{id}/$status"))
        .await
        .json();
    status["entry"][0]["resource"]["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "error")?["valueCodeableConcept"]["text"]
        .as_str()
        .map(str::to_owned)
}

/// An https receiver on loopback with a certificate for `localhost` from a CA made here; the
/// CA's PEM is returned for the server to trust.
async fn tls_receiver() -> (Receiver, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("certificate");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone(), ca.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der"),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let inbox = Arc::new(Inbox::default());
    let app = axum::Router::new()
        .route("/hook/{name}", post(hook))
        .with_state(inbox.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (Receiver { port, inbox, task }, ca.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_are_delivered_to_over_verified_tls() {
    let (r, ca_pem) = tls_receiver().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write the CA");
    let prefix = format!("https://localhost:{}/", r.port);
    // The operator allows the loopback endpoint and trusts the CA, as the flags do.
    let args = fhirstore_server::config::SubscriptionArgs {
        endpoints: vec![prefix.clone()],
        ca: Some(ca_file),
        retry_base: Some(Duration::from_millis(50)),
        ..Default::default()
    };
    let storage = fhirstore_server::config::StorageArgs::default();
    let serve = fhirstore_server::config::ServeArgs {
        subscriptions: args,
        ..Default::default()
    };
    let (_, mut settings) =
        fhirstore_server::config::serve_settings(&storage, &serve).expect("settings");
    settings.subscriptions.poll = Duration::from_millis(50);
    let s = support::server(settings.clone()).await;
    let engine = s.app.subscriptions.clone();
    let loops = engine.start().await;
    let url = format!("{prefix}hook/tls");
    let resp = s
        .post(
            "/fhir/t/Subscription",
            &subscription("Patient?gender=male", &url, None),
        )
        .await;
    assert_eq!(resp.status, StatusCode::CREATED);
    let id = resp.json()["id"].as_str().unwrap_or("").to_owned();
    let resp = s
        .put(
            "/fhir/t/Patient/m1",
            &json!({"resourceType": "Patient", "id": "m1", "gender": "male"}),
        )
        .await;
    assert!(resp.status.is_success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while numbers(&r.notes("tls")) != [1] {
        assert!(
            Instant::now() < deadline,
            "nothing arrived over TLS; the subscription's last error: {:?}",
            delivery_error(&s, "t", &id).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.stop();
    for t in loops {
        let _ = t.await;
    }

    // Without the CA, the same endpoint fails verification and nothing arrives.
    settings.subscriptions.extra_roots.clear();
    let s = support::server(settings).await;
    let engine = s.app.subscriptions.clone();
    let loops = engine.start().await;
    let resp = s
        .post(
            "/fhir/t/Subscription",
            &subscription(
                "Patient?gender=male",
                &format!("{prefix}hook/untrusted"),
                None,
            ),
        )
        .await;
    let id = resp.json()["id"].as_str().unwrap_or("").to_owned();
    s.put(
        "/fhir/t/Patient/m1",
        &json!({"resourceType": "Patient", "id": "m1", "gender": "male"}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        if let Some(e) = delivery_error(&s, "t", &id).await {
            break e;
        }
        assert!(Instant::now() < deadline, "no delivery error was recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(error.contains("TLS"), "{error}");
    assert!(r.notes("untrusted").is_empty());
    engine.stop();
    for t in loops {
        let _ = t.await;
    }
}
