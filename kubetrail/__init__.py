"""kubetrail: records what happens in a Kubernetes cluster and delivers it with nothing lost
and nothing repeated.

Layers, each importing only from the ones below it::

    cli            click commands (run, check, convert, plugins, version)
    runtime        pipeline assembly, routing, sink runners, metrics server, shutdown
    sources/ transforms/ sinks/   one module per plugin
    kube           thin async Kubernetes API client
    core           records, batches, acknowledgements, config model, value syntax, state
"""

__version__ = "0.1.0"
