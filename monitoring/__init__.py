"""genloop monitoring: Prometheus instruments (more to come: drift, dashboards, alerts)."""
