"""Trusted-execution evidence, checked without I/O: AMD SEV-SNP attestation reports and AMD's
certificate chain (``sev_snp``). Fetching evidence (the enclave's certificate, AMD's VCEK) is the
backends'."""
