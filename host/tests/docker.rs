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
    // Profile `scale`: NATS with JetStream, the generator publishing to
    // the stream three hosts with their own ids read.
    let scale = |name: &str| {
        let service = &compose["services"][name];
        assert_eq!(
            service["profiles"][0].as_str(),
            Some("scale"),
            "{name} is in profile scale"
        );
        service
    };
    let args = |service: &serde_yaml::Value| -> Vec<String> {
        service["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    let after = |args: &[String], flag: &str| {
        let i = args.iter().position(|a| a == flag).unwrap();
        args[i + 1].clone()
    };
    assert!(args(scale("nats")).contains(&"-js".to_owned()));
    let stream = after(&args(scale("generator-nats")), "--output");
    assert!(stream.starts_with("nats://nats:4222/"), "{stream}");
    let mut ids = std::collections::BTreeSet::new();
    for name in ["host-1", "host-2", "host-3"] {
        let args = args(scale(name));
        assert_eq!(after(&args, "--input"), stream, "{name} reads the stream");
        ids.insert(after(&args, "--host-id"));
        assert!(compose["services"][name]["depends_on"]
            .get("nats")
            .is_some());
    }
    assert_eq!(ids.len(), 3, "each host has its own --host-id");

    let sql = std::fs::read_to_string(docker.join("postgres/postgres_setup.sql")).unwrap();
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(squash(&sql).contains(&squash(host::sink::schema::EVENTS_TABLE.trim())));
}
