"""A thin async Kubernetes API client on aiohttp.

No generated models: list and watch hand back plain dicts, decoded with orjson, because an
Events collector touches a handful of fields and must not pay for typed objects per event.

* :mod:`.config`: where the API server is and how to authenticate (explicit Fluent Bit options,
  in-cluster service account files, or a kubeconfig for running outside a cluster);
* :mod:`.credentials`: the token file (re-read after its TTL and on 401) and TLS contexts
  (reloaded when the CA files change on disk). Tokens never come from environment variables;
* :mod:`.client`: requests, paginated lists, watch streams, typed API errors;
* :mod:`.backoff`: exponential backoff with jitter;
* :mod:`.leader`: leader election on ``coordination.k8s.io/v1`` Leases.
"""
