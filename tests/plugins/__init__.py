"""Method plugins used by the tests (loaded with LAMINA_PLUGINS, as a user's would be)."""
