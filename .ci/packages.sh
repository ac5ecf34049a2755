#!/usr/bin/env bash
# Install what the observability, discovery and shared-limits tests run against, from
# Debian's packages: prometheus (with promtool), dnsmasq and redis-server. Does nothing
# when all are there.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null && [ -x /usr/sbin/dnsmasq ] \
    && [ -x /usr/bin/redis-server ]; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
install() {
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus dnsmasq-base redis-server
}
install || { $sudo apt-get update -qq && install; }
