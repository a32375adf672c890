//! Credentials, the tenant header and the acting-user header.

use agentgate::tenant::KeyRole;
use reqwest::Method;
use serde_json::json;

use crate::helpers::{assert_unauthorized, make_key, spawn, Body};

/// The token with its 64-hex secret replaced by another well-formed one.
fn wrong_secret(token: &str) -> String {
    let (head, secret) = token.rsplit_once('_').unwrap();
    assert_eq!(secret.len(), 64);
    let flipped = if secret.starts_with('0') { "1" } else { "0" };
    format!("{head}_{flipped}{}", &secret[1..])
}

#[tokio::test]
async fn every_bad_credential_gets_the_same_401() {
    let app = spawn().await;
    let good = app.a.admin.token.clone();
    assert_eq!(app.get("/api/v1/settings", &good).await.status, 200);

    let none = app
        .call(Method::GET, "/api/v1/settings", None, &[], Body::None)
        .await;
    assert_unauthorized(&none, "no Authorization");
    for (what, header) in [
        ("basic scheme", format!("Basic {good}")),
        ("no space", format!("Bearer{good}")),
        ("empty bearer", "Bearer ".to_owned()),
    ] {
        let r = app
            .call(
                Method::GET,
                "/api/v1/settings",
                None,
                &[("authorization", &header)],
                Body::None,
            )
            .await;
        assert_unauthorized(&r, what);
    }
    let unknown_id = format!("agk_{}_{}", ulid::Ulid::new(), "ab".repeat(32));
    for (what, token) in [
        ("garbage", "garbage".to_owned()),
        ("wrong prefix", good.replacen("agk_", "agx_", 1)),
        ("truncated", good[..good.len() - 1].to_owned()),
        ("wrong secret", wrong_secret(&good)),
        ("unknown id", unknown_id),
        // B's secret under A's id.
        (
            "secret of another key",
            format!(
                "{}_{}",
                good.rsplit_once('_').unwrap().0,
                app.b.admin.token.rsplit_once('_').unwrap().1
            ),
        ),
    ] {
        assert_unauthorized(&app.get("/api/v1/settings", &token).await, what);
    }

    // Expired at birth.
    let expired = make_key(
        &app.services,
        &app.a.id,
        "expired",
        KeyRole::Admin,
        vec![],
        Some(chrono::Duration::seconds(-1)),
    )
    .await;
    assert_unauthorized(
        &app.get("/api/v1/settings", &expired.token).await,
        "expired",
    );

    // Revoked through the API.
    let doomed = make_key(
        &app.services,
        &app.a.id,
        "doomed",
        KeyRole::Compliance,
        vec![],
        None,
    )
    .await;
    assert_eq!(app.get("/api/v1/settings", &doomed.token).await.status, 200);
    let r = app
        .delete(&format!("/api/v1/keys/{}", doomed.id), &good)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_unauthorized(&app.get("/api/v1/settings", &doomed.token).await, "revoked");
    let keys = app.get("/api/v1/keys", &good).await.json();
    let rec = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == doomed.id.as_str())
        .unwrap();
    assert_eq!(rec["live"], false, "{rec}");
    assert!(rec["revoked_at"].is_string(), "{rec}");
    assert!(
        !keys.to_string().contains("hash"),
        "the key hash is listed: {keys}"
    );

    // Rotation with an overlap: both work.
    let old = make_key(
        &app.services,
        &app.a.id,
        "rotating",
        KeyRole::Compliance,
        vec![],
        None,
    )
    .await;
    let r = app
        .post(
            &format!("/api/v1/keys/{}/rotate", old.id),
            &good,
            json!({"overlap_secs": 3600}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let new = r.json();
    let new_token = new["token"].as_str().unwrap().to_owned();
    assert_ne!(new["id"], old.id.as_str());
    assert_eq!(new["role"], "compliance");
    assert_eq!(new["name"], "rotating");
    assert_ne!(new_token, old.token);
    assert_eq!(
        app.get("/api/v1/settings", &old.token).await.status,
        200,
        "old key during the overlap"
    );
    assert_eq!(
        app.get("/api/v1/settings", &new_token).await.status,
        200,
        "new key"
    );
    // The new key has the old key's role and no more.
    assert_eq!(
        app.patch("/api/v1/settings", &new_token, json!({"name": "x"}))
            .await
            .status,
        403
    );

    // Rotation without an overlap: the old key stops at once.
    let old = make_key(
        &app.services,
        &app.a.id,
        "rotating-now",
        KeyRole::Admin,
        vec![],
        None,
    )
    .await;
    let r = app
        .post(
            &format!("/api/v1/keys/{}/rotate", old.id),
            &good,
            json!({"overlap_secs": 0}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let new_token = r.json()["token"].as_str().unwrap().to_owned();
    assert_unauthorized(
        &app.get("/api/v1/settings", &old.token).await,
        "rotated, no overlap",
    );
    assert_eq!(app.get("/api/v1/settings", &new_token).await.status, 200);
    // Rotating or revoking an unknown id is a 404.
    assert_eq!(
        app.delete("/api/v1/keys/01ARZ3NDEKTSV4RRFFQ69G5FAV", &good)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn the_tenant_header_must_name_the_keys_tenant() {
    let app = spawn().await;
    let token = &app.a.admin.token;
    let b_id = app.b.id.to_string();
    let a_events = app.events(&app.a.id).await.len();
    let b_events = app.events(&app.b.id).await.len();
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/settings",
            Some(token),
            &[("agentgate-tenant", &b_id)],
            Body::Json(json!({"name": "hijacked"})),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error(), "the tenant header does not match the key");
    let r = app
        .get_h("/api/v1/settings", token, &[("agentgate-tenant", &b_id)])
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(!r.text().contains(&app.b.name), "{}", r.text());
    // Nothing was done in either tenant.
    assert_eq!(app.settings(&app.a.id).name, app.a.name);
    assert_eq!(app.settings(&app.b.id).name, app.b.name);
    assert_eq!(app.events(&app.a.id).await.len(), a_events);
    assert_eq!(app.events(&app.b.id).await.len(), b_events);
    // The matching header is fine.
    let a_id = app.a.id.to_string();
    let r = app
        .get_h("/api/v1/settings", token, &[("agentgate-tenant", &a_id)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], app.a.name.as_str());
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/settings",
            Some(token),
            &[("agentgate-tenant", &a_id)],
            Body::Json(json!({"name": "renamed-a"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(app.settings(&app.a.id).name, "renamed-a");
}

#[tokio::test]
async fn only_service_keys_may_act_for_a_user() {
    let app = spawn().await;
    // A service key can reach no admin route with its own scopes alone.
    let r = app.get("/api/v1/settings", &app.a.service.token).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let acting = [("agentgate-acting-user", "slack:U0AOWNER")];
    let r = app
        .get_h("/api/v1/settings", &app.a.service.token, &acting)
        .await;
    assert_eq!(
        r.status,
        403,
        "accepted, but still without the scope: {}",
        r.text()
    );
    assert_eq!(r.error(), "this needs the admin:read scope");
    // A service key granted admin:read, acting for the owner, reads.
    let reader = make_key(
        &app.services,
        &app.a.id,
        "reader",
        KeyRole::Service,
        vec!["admin:read".into()],
        None,
    )
    .await;
    let r = app.get_h("/api/v1/settings", &reader.token, &acting).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], app.a.name.as_str());

    // Other keys may not send the header.
    for (what, token) in [
        ("admin", &app.a.admin.token),
        ("compliance", &app.a.compliance.token),
    ] {
        let r = app.get_h("/api/v1/settings", token, &acting).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.error(), "invalid acting user", "{what}");
    }
    // A malformed header is a 400 even for a service key.
    // So is one that names anyone but a workspace's user: the operator, the gateway, a key.
    for bad in [
        "U0AOWNER",
        "slack:",
        "",
        "slack:U0 AOWNER",
        "operator:cli",
        "system:agent",
        "key:01M8SY416AZ7A2E2H8YQRVH7K8",
        "slackx:U0AOWNER",
    ] {
        let r = app
            .get_h(
                "/api/v1/settings",
                &reader.token,
                &[("agentgate-acting-user", bad)],
            )
            .await;
        assert_eq!(r.status, 400, "{bad:?}: {}", r.text());
        assert_eq!(r.error(), "invalid acting user");
    }
}

/// A service key with extra admin scopes, acting for a viewer, holds the viewer's role, and its
/// `admin:write` scope does not reach past that role: every handler that changes the tenant
/// refuses it, those that check the role (PUT grants, members) and those that check the scope
/// alone (PATCH settings, DELETE grants) alike.
#[tokio::test]
async fn acting_for_a_viewer_never_grants_admin_writes() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    assert_eq!(
        app.put(
            "/api/v1/members/slack:U0VIEWER",
            a,
            json!({"role": "viewer"})
        )
        .await
        .status,
        200
    );
    assert_eq!(
        app.put(
            "/api/v1/tools/grants/memory.save",
            a,
            json!({"min_role": "member"})
        )
        .await
        .status,
        200
    );
    // A service key is no longer made with admin:write (it can never use it); one made before
    // that was refused still holds it in its record.
    let refused = app
        .services
        .tenants
        .create_key_as_operator(
            &app.a.id,
            "integration",
            KeyRole::Service,
            vec!["admin:write".into()],
            None,
        )
        .await
        .expect_err("refused");
    assert_eq!(
        refused.to_string(),
        "the scope admin:write is only for admin keys"
    );
    let key = make_key(
        &app.services,
        &app.a.id,
        "integration",
        KeyRole::Service,
        vec!["admin:read".into()],
        None,
    )
    .await;
    let op = app.services.tenants.operator_context(&app.a.id).unwrap();
    let keys = app.services.store.for_tenant(&op).unwrap();
    let mut record = keys.api_keys().get_key(&key.id).unwrap().unwrap();
    record.scopes.push("admin:write".into());
    keys.api_keys().put_key(&record).unwrap();
    let viewer = [("agentgate-acting-user", "slack:U0VIEWER")];
    // The role check refuses this one…
    let r = app
        .call(
            Method::PUT,
            "/api/v1/tools/grants/memory.recall",
            Some(&key.token),
            &viewer,
            Body::Json(json!({"min_role": "viewer"})),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    // …and these must be refused the same way: a viewer may not make itself an admin…
    let r = app
        .call(
            Method::PUT,
            "/api/v1/members/slack:U0VIEWER",
            Some(&key.token),
            &viewer,
            Body::Json(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    // …nor change settings or remove grants.
    let r = app
        .call(
            Method::PATCH,
            "/api/v1/settings",
            Some(&key.token),
            &viewer,
            Body::Json(json!({"name": "changed-by-a-viewer"})),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = app
        .call(
            Method::DELETE,
            "/api/v1/tools/grants/memory.save",
            Some(&key.token),
            &viewer,
            Body::None,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(app.settings(&app.a.id).name, app.a.name);
}

/// Only an owner may make an owner, and an admin may neither demote the owner nor take the
/// owner's role away: changing a member checks the target's current role too.
#[tokio::test]
async fn an_admin_cannot_demote_or_remove_the_owner() {
    let app = spawn().await;
    let a = &app.a.admin.token;
    let r = app
        .put(
            "/api/v1/members/slack:U0AOWNER",
            a,
            json!({"role": "viewer"}),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = app.delete("/api/v1/members/slack:U0AOWNER", a).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let members = app.get("/api/v1/members", a).await.json();
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["principal"] == "slack:U0AOWNER" && m["role"] == "owner"),
        "{members}"
    );
}

/// The `api-key:` changes in a tenant's log, in order: what key creation, revocation and
/// rotation record.
async fn key_changes(app: &crate::helpers::TestApp) -> Vec<serde_json::Value> {
    app.events(&app.a.id)
        .await
        .into_iter()
        .filter(|e| {
            e["type"] == "settings.changed"
                && e["data"]["fields"][0]
                    .as_str()
                    .is_some_and(|f| f.starts_with("api-key:"))
        })
        .collect()
}

/// Rotating a key that no longer works would hand out a live successor of a key an admin took
/// away (revoked) or that ran out (expired). Both are refused with 409, nothing is made or
/// audited, and another tenant still gets the plain 404, so the 409 tells it nothing.
#[tokio::test]
async fn a_revoked_or_expired_key_cannot_be_rotated() {
    let app = spawn().await;
    let admin = app.a.admin.token.clone();
    let revoked = make_key(
        &app.services,
        &app.a.id,
        "revoked",
        KeyRole::Admin,
        vec![],
        None,
    )
    .await;
    let r = app
        .delete(&format!("/api/v1/keys/{}", revoked.id), &admin)
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    let expired = make_key(
        &app.services,
        &app.a.id,
        "expired",
        KeyRole::Compliance,
        vec![],
        Some(chrono::Duration::seconds(-1)),
    )
    .await;
    let keys_before = app.get("/api/v1/keys", &admin).await.json();
    let changes_before = key_changes(&app).await;

    for (what, key) in [("revoked", &revoked), ("expired", &expired)] {
        let r = app
            .post(
                &format!("/api/v1/keys/{}/rotate", key.id),
                &admin,
                json!({"overlap_secs": 3600}),
            )
            .await;
        assert_eq!(r.status, 409, "{what}: {}", r.text());
        assert_eq!(r.content_type, "application/json", "{what}");
        assert_eq!(
            r.error(),
            "the key is revoked or expired; make a new key instead",
            "{what}"
        );
        assert!(r.json().get("token").is_none(), "{what}: {}", r.text());
        // Another tenant's admin cannot tell the key exists, let alone its state.
        let r = app
            .post(
                &format!("/api/v1/keys/{}/rotate", key.id),
                &app.b.admin.token,
                json!({"overlap_secs": 3600}),
            )
            .await;
        assert_eq!(r.status, 404, "{what} from B: {}", r.text());
        assert_eq!(r.error(), "not found", "{what} from B");
    }
    assert_eq!(
        app.get("/api/v1/keys", &admin).await.json(),
        keys_before,
        "a refused rotation made or changed a key"
    );
    assert_eq!(
        key_changes(&app).await,
        changes_before,
        "a refused rotation was audited"
    );
    // Neither key came back to life.
    assert_unauthorized(
        &app.get("/api/v1/settings", &revoked.token).await,
        "revoked",
    );
    assert_unauthorized(
        &app.get("/api/v1/settings", &expired.token).await,
        "expired",
    );

    // A live key still rotates, and so does one inside an earlier rotation's overlap, which is
    // still live until the overlap ends.
    let rotate = format!("/api/v1/keys/{}/rotate", app.a.compliance.id);
    for what in ["live", "inside the overlap"] {
        let r = app
            .post(&rotate, &admin, json!({"overlap_secs": 3600}))
            .await;
        assert_eq!(r.status, 201, "{what}: {}", r.text());
    }
}

/// A rotation racing a revocation of the same key: whichever goes first, once the revocation has
/// returned the old key is revoked no later than that moment (a racing rotation must not move it
/// an overlap later), and a successor exists only if the rotation went first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_racing_a_revocation_never_outlives_it() {
    let app = spawn().await;
    let admin = app.services.tenants.operator_context(&app.a.id).unwrap();
    let repo = app.services.store.for_tenant(&admin).unwrap();
    for round in 0..20 {
        let k = make_key(
            &app.services,
            &app.a.id,
            &format!("race-{round}"),
            KeyRole::Admin,
            vec![],
            None,
        )
        .await;
        let (t1, t2) = (app.services.tenants.clone(), app.services.tenants.clone());
        let (c1, c2) = (admin.clone(), admin.clone());
        let (id1, id2) = (k.id.clone(), k.id.clone());
        let rotate =
            tokio::spawn(async move { t1.rotate_key(&c1, &id1, chrono::Duration::hours(1)).await });
        let revoke = tokio::spawn(async move {
            t2.revoke_key(&c2, &id2, chrono::Utc::now()).await.unwrap();
            chrono::Utc::now()
        });
        let revoked_by = revoke.await.unwrap();
        let rotated = rotate.await.unwrap();
        let old = repo.api_keys().get_key(&k.id).unwrap().unwrap();
        assert!(
            old.revoked_at.unwrap() <= revoked_by,
            "round {round}: revoked at {:?}, after the revocation returned at {revoked_by}",
            old.revoked_at
        );
        let named: Vec<_> = repo
            .api_keys()
            .keys()
            .unwrap()
            .into_iter()
            .filter(|key| key.name == format!("race-{round}"))
            .collect();
        match rotated {
            // The rotation went first: its successor is the one other key of that name, and it
            // outlives the revocation of the key it replaced.
            Ok(new) => {
                assert_eq!(named.len(), 2, "round {round}: {named:?}");
                let successor = named.iter().find(|key| key.id == new.record.id).unwrap();
                assert!(agentgate::tenant::is_live(successor, chrono::Utc::now()));
            }
            // The revocation went first: no successor was made.
            Err(e) => {
                assert!(e.to_string().contains("revoked or expired"), "{e}");
                assert_eq!(named.len(), 1, "round {round}: {named:?}");
            }
        }
    }
}

/// Keys made through the API always expire (90 days unless asked, at most 3650), a lifetime too
/// large for a date is a 400 rather than a dropped connection, and a key cannot make or rotate
/// itself a successor that outlives it: a leaked short-lived admin key does not become a lasting
/// one. Nothing refused is made or audited.
#[tokio::test]
async fn api_keys_always_expire_and_never_outlive_the_key_that_makes_them() {
    let app = spawn().await;
    let admin = app.a.admin.token.clone();
    let r = app
        .post(
            "/api/v1/keys",
            &admin,
            json!({"name": "ci", "role": "compliance"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let made = chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap();
    let off = (expires - made - chrono::Duration::days(90)).abs();
    assert!(off < chrono::Duration::seconds(1), "{v}");

    let brief = make_key(
        &app.services,
        &app.a.id,
        "brief",
        KeyRole::Admin,
        vec![],
        Some(chrono::Duration::days(2)),
    )
    .await;
    let keys_before = app.get("/api/v1/keys", &admin).await.json();
    let changes_before = key_changes(&app).await;
    for days in [json!(0), json!(3651), json!(4_294_967_295_u64)] {
        let r = app
            .post(
                "/api/v1/keys",
                &admin,
                json!({"name": "x", "role": "admin", "expires_in_days": days}),
            )
            .await;
        assert_eq!(r.status, 400, "{days}: {}", r.text());
        assert_eq!(
            r.error(),
            "expires_in_days must be from 1 to 3650",
            "{days}"
        );
    }

    let refused = [
        (
            "a longer key",
            "/api/v1/keys".to_owned(),
            json!({"name": "x", "role": "admin", "expires_in_days": 30}),
        ),
        (
            "the default lifetime",
            "/api/v1/keys".to_owned(),
            json!({"name": "x", "role": "admin"}),
        ),
    ];
    for (what, path, body) in refused {
        let r = app.post(&path, &brief.token, body).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert!(
            r.error()
                .starts_with("a key may not make a key that outlives it"),
            "{what}: {}",
            r.text()
        );
        assert!(r.json().get("token").is_none(), "{what}");
    }
    assert_eq!(
        app.get("/api/v1/keys", &admin).await.json(),
        keys_before,
        "a refused key was made or changed"
    );
    assert_eq!(
        key_changes(&app).await,
        changes_before,
        "a refused key was audited"
    );
    // One that ends before it is made.
    let r = app
        .post(
            "/api/v1/keys",
            &brief.token,
            json!({"name": "y", "role": "service", "expires_in_days": 1}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());

    let expiry = |v: &serde_json::Value| {
        chrono::DateTime::parse_from_rfc3339(v["expires_at"].as_str().unwrap()).unwrap()
    };
    let keys = app.get("/api/v1/keys", &admin).await.json();
    let brief_end = expiry(
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| k["id"] == brief.id.as_str())
            .unwrap(),
    );
    // A rotation hands over no more than the asking key has left: a key that never expires,
    // rotated by the brief key, gets a successor that ends with the brief key...
    let r = app
        .post(
            &format!("/api/v1/keys/{}/rotate", app.a.compliance.id),
            &brief.token,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(expiry(&r.json()), brief_end);
    // ...and rotated by a key that never expires, one that ends after the API's 90 days.
    let r = app
        .post(
            &format!("/api/v1/keys/{}/rotate", app.a.service.id),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let made = chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap()).unwrap();
    assert!((expiry(&v) - made - chrono::Duration::days(90)).abs() < chrono::Duration::seconds(1));
    // A key rotating itself keeps working: its successor ends when it would have.
    let r = app
        .post(
            &format!("/api/v1/keys/{}/rotate", brief.id),
            &brief.token,
            json!({"overlap_secs": 60}),
        )
        .await;
    assert_eq!(r.status, 201, "self-rotation: {}", r.text());
    assert_eq!(expiry(&r.json()), brief_end);
    // In its overlap the old key ends in a minute, and cannot use it to make a lasting key.
    let r = app
        .post(
            "/api/v1/keys",
            &brief.token,
            json!({"name": "z", "role": "admin", "expires_in_days": 1}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r
        .error()
        .starts_with("a key may not make a key that outlives it"));
}

/// A key revoked after it was checked for a request (between authentication and the rotation
/// itself) rotates nothing: it has no lifetime left to hand over, and the target stays as it was.
#[tokio::test]
async fn a_key_revoked_after_it_was_checked_rotates_nothing() {
    let app = spawn().await;
    let asking = make_key(
        &app.services,
        &app.a.id,
        "asking",
        KeyRole::Admin,
        vec![],
        Some(chrono::Duration::days(2)),
    )
    .await;
    let ctx = app
        .services
        .tenants
        .authenticate(&asking.token, None, None, None)
        .unwrap();
    let operator = app.services.tenants.operator_context(&app.a.id).unwrap();
    app.services
        .tenants
        .revoke_key(&operator, &asking.id, chrono::Utc::now())
        .await
        .unwrap();
    let r = app
        .services
        .tenants
        .rotate_key(&ctx, &app.a.compliance.id, chrono::Duration::zero())
        .await;
    assert!(
        matches!(r, Err(agentgate::tenant::KeyError::Forbidden)),
        "{r:?}"
    );
    assert_eq!(
        app.get("/api/v1/settings", &app.a.compliance.token)
            .await
            .status,
        200,
        "the target still works"
    );
}
