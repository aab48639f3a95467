"""Thin Celery tasks: load ids, call a core service, record the outcome on the job."""
