"""Prefect flows: the order of the stages, and nothing else.

`flows.noisy_student` holds the flow `noisy-student`; `flows.deployments` its deployments
and the flow `noisy-student-watch`; `flows.events` the new-data event. Nothing is imported
here, so that light commands (`noisy-student ingest append`) need not load torch.
"""
