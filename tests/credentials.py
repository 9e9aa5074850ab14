"""The bootstrap admin key every test gateway is configured with, and the header that
carries it (tests go through the front door like any caller)."""

TEST_ADMIN_KEY = "ifn_0123456789ab_" + "test-admin-secret-0000000000000000"
ADMIN_HEADERS = {"Authorization": f"Bearer {TEST_ADMIN_KEY}"}
