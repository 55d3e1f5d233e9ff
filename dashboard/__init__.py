"""Streamlit dashboard: ``streamlit run dashboard/app.py [-- --data DIR --runs DIR]``."""
