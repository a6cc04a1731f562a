"""The workflow's job support: the config check, cluster resources, GPU leases, the retry guard and the
end-of-run summary."""
