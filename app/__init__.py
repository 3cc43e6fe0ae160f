"""The Streamlit app: ``streamlit run app/main.py``. Pages lay out widgets (app/views/),
``app/ui.py`` holds the shared sidebar and caches, ``app/services.py`` does the work."""
