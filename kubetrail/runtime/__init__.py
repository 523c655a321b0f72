"""The runtime: builds a pipeline from config and runs it.

``pipeline.py`` is the whole lifecycle in one short module (build, start, stop, drain);
``router.py`` moves batches through transforms to sink buffers by Fluent Bit tag rules;
``sink_runner.py`` owns retries, acknowledgements and metrics around each sink;
``plugins.py`` maps plugin names to classes and declares the options every instance shares.
"""
