compress-table table=digits_pareto plot=true
