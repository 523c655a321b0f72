"""Who did what: timelines of an object or a user from the embedded store or Elasticsearch.

* :mod:`.model`: object references (``KIND[/NAMESPACE]/NAME``), kinds and their short names,
  time bounds, and turning stored records into timeline entries with what changed.
* :mod:`.store`: the queries against the ``sqlite`` output's store.
* :mod:`.es`: the same queries against Elasticsearch / OpenSearch, on the fields kubetrail writes.
* :mod:`.render`: the text form of a timeline.
* :mod:`.ui`: ``kubetrail ui``, the web timeline.
"""
