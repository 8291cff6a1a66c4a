"""genloop monitoring: Prometheus instruments, drift of live prompts (Evidently), which held-out set live
prompts resemble, Grafana dashboards and alert rules as code, Prometheus scrape targets. Imports nothing of
genloop's other packages."""
