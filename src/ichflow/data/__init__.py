"""Data readers, manifest, validation report and patient-level splits."""
