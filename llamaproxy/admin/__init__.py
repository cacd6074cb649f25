"""The operator's web page (``ADMIN_LISTEN``): backends, activity, keys, a 15-minute chart and the
llama-server children's logs, live.

- :mod:`~llamaproxy.admin.activity`: the last requests (a bounded ring fed by the access entries
  the gateway builds anyway);
- :mod:`~llamaproxy.admin.series`: the 15-minute time series and per-key minute rates, sampled from
  the metrics' cumulative counters on a timer (nothing per request);
- :mod:`~llamaproxy.admin.childlog`: the tail of each child's log (a log observer, redacted when
  shown);
- :mod:`~llamaproxy.admin.sessions`: login with an admin key, session cookies, CSRF tokens;
- :mod:`~llamaproxy.admin.view`: what the page shows, read from the live objects;
- :mod:`~llamaproxy.admin.page`: the HTML (``twisted.web.template``) and the inline SVG chart;
- :mod:`~llamaproxy.admin.resource`: the HTTP side: pages, forms, Server-Sent Events, polling;
- :mod:`~llamaproxy.admin.service`: the service that runs the timers and the listener.
"""
