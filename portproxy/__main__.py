from portproxy.cli import main

main()
