"""The experiment tools: tm3-testserver, tm3-testclient, tm3-demo. Product code never imports them."""
