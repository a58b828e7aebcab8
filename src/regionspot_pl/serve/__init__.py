"""Name regions over HTTP (``python -m regionspot_pl.serve``, on LitServe) and on a web page
(``python -m regionspot_pl.app``, on Gradio), both through :class:`~.engine.NamingEngine`."""
