//! No Docker engine runs here, so check what can be checked: the compose
//! file parses, names the services with the documented defaults, and
//! every volume and file it refers to exists; the setup SQL creates the
//! same table the host creates.

mod common;

use common::repo;

#[test]
fn compose_file_is_consistent() {
    let docker = repo().join("docker");
    let text = std::fs::read_to_string(docker.join("docker-compose.yml")).unwrap();
    let compose: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let services = compose["services"].as_mapping().unwrap();
    for name in ["postgres", "host", "generator"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let pg = &compose["services"]["postgres"];
    let env = &pg["environment"];
    assert_eq!(
        env["POSTGRES_DB"].as_str(),
        Some("${POSTGRES_DB:-ecommerce}")
    );
    assert_eq!(
        env["POSTGRES_USER"].as_str(),
        Some("${POSTGRES_USER:-spark}")
    );
    assert_eq!(
        env["POSTGRES_PASSWORD"].as_str(),
        Some("${POSTGRES_PASSWORD:-spark123}")
    );
    assert!(pg["healthcheck"]["test"].is_sequence());
    // Only the compose network reaches the database; published ports bind
    // loopback only (docs/security.md).
    assert!(
        pg.get("ports").is_none(),
        "postgres publishes a port: {:?}",
        pg["ports"]
    );
    for (name, service) in services {
        for port in service
            .get("ports")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            let port = port.as_str().unwrap_or_default();
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name:?} publishes {port:?} beyond loopback"
            );
        }
    }

    let declared = compose["volumes"].as_mapping().unwrap();
    for (name, service) in services {
        if let Some(build) = service.get("build") {
            let context = docker.join(build["context"].as_str().unwrap());
            assert!(
                context.join(build["dockerfile"].as_str().unwrap()).exists(),
                "{name:?}: Dockerfile"
            );
        }
        for volume in service
            .get("volumes")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
        {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(docker.join(source).exists(), "{name:?}: {source} exists");
            } else {
                assert!(
                    declared.contains_key(source),
                    "{name:?}: volume {source} is declared"
                );
            }
        }
    }
    let sql = std::fs::read_to_string(docker.join("postgres/postgres_setup.sql")).unwrap();
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(squash(&sql).contains(&squash(host::sink::schema::EVENTS_TABLE.trim())));
}
