"""Provisioning: run catalogued Ansible playbooks on registered devices as EVC jobs."""
